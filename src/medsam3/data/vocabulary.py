"""The unified concept vocabulary: one canonical clinical term per label, whatever the dataset calls it.

Every label name a dataset ships (``kidney_left``, ``Left Kidney``, ``kidney L``, MSD ``Anterior``) is
mapped to one canonical concept term (``"left kidney"``, ``"anterior hippocampus"``), the text prompt used in
training and evaluation alike.

Resolution of a name, in order:

1. :func:`normalize_term`: lowercase, ``_`` / ``+`` / repeated blanks become one space, side words
   (``l``, ``lt``, ``r``, ``rt``, ``left``, ``right``) become ``left`` / ``right`` and move to the front,
   British spellings become US ones (``tumour`` -> ``tumor``).
2. Dataset-scoped terms (``datasets`` in the JSON): a key applies to a dataset whose name contains every
   word of the key, so ``Anterior`` means ``anterior hippocampus`` in ``Task04_Hippocampus`` only.
3. Canonical terms and their synonyms (``concepts`` in the JSON), then the same with the last word's
   plural made singular (:func:`singular_forms`: ``polyps`` -> ``polyp``, ``arteries`` -> ``artery``,
   ``hippocampi`` -> ``hippocampus``, ``vertebrae`` -> ``vertebra``).
4. Otherwise the normalised text itself is kept, and the name is reported as unknown.

The bundled ``vocabulary.json`` can be extended or overridden by a user file of the same form
(:meth:`Vocabulary.merged`): user synonyms win over bundled ones.

Prompt sentences
----------------
:meth:`Vocabulary.match_sentence` maps a challenge-style sentence ("CT imaging of the spleen within the
abdomen", "Visualization of the left kidney in MRI") to one concept, by this rule:

1. **Words.** The sentence is lower-cased; its words are the runs of letters and digits (hyphens,
   slashes, brackets and punctuation separate words: "non-enhancing" is ``non enhancing``); British
   spellings become US ones (``tumour`` -> ``tumor``). Every canonical term and synonym is split into words
   the same way after :func:`normalize_term` (so ``kidney_left`` is ``left kidney``).
2. **Phrases.** The words are cut into phrases at the relation words of :data:`PHRASE_BREAKS` (``of``,
   ``in``, ``within``, ``on``, ``showing``, ...), which are dropped (so a term holding one of them never
   matches; the bundled vocabulary has none). Modality and filler words (``ct``, ``mri``, ``imaging``,
   ``visualization``, ``the``) need no list: they are in no term, so they never match.
3. **Matches.** A term matches where its words appear consecutively inside one phrase; a sentence word
   also matches the term word ``w`` as a plural (``ws``, ``wes``, ``w[:-1]ies`` for ``...y``, ``wae`` for
   ``...a``, ``w[:-2]i`` for ``...us``).
4. **Choice.** The first phrase holding a match names the target (the sentence's subject comes before its
   context: "lesion in the left lung" is a lesion). Inside it the words are read left to right, taking at
   each word the longest term that starts there and skipping the words it covers (so "enhancing tumor
   region" takes ``enhancing tumor``, not the overlapping ``tumor region``). Of the terms taken, the one
   with the most words wins; among equally long ones the **last** (the head noun ends an English noun
   phrase: "pancreas lesion" is a lesion).
5. **Context.** When the phrase right after the chosen one names a concept ``O`` and ``"O C"`` (``C`` the
   chosen concept) is a term or synonym, that concept is taken: "tumor of the liver" -> ``liver tumor``,
   "lesion in the liver" -> ``liver tumor`` (``liver lesion`` is its synonym).
6. **Side.** When the chosen phrase holds exactly one side word (``left`` / ``right``) outside the match
   and ``"<side> C"`` is a concept, that concept is taken: "kidney (right)" -> ``right kidney``.
7. No match anywhere: the sentence is **unmapped** (:attr:`SentenceMatch.concept` is ``None``) and a
   caller uses it as written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from medsam3.errors import InputError
from medsam3.io.jsonfile import read_json

BUNDLED_VOCABULARY = Path(__file__).with_name("vocabulary.json")

_SIDES = {"l": "left", "lt": "left", "left": "left", "r": "right", "rt": "right", "right": "right"}
_US_SPELLING = {
    "tumour": "tumor",
    "tumours": "tumors",
    "oesophagus": "esophagus",
    "oedema": "edema",
    "haemorrhage": "hemorrhage",
    "haematoma": "hematoma",
    "foetal": "fetal",
    "foetus": "fetus",
    "colour": "color",
    "oesophageal": "esophageal",
}


#: Words that make a concept depend on the image's orientation: such concepts are never mirrored, neither
#: by training augmentation (:mod:`medsam3.train.augment`) nor by test-time mirroring
#: (:mod:`medsam3.predict.tta`): a mirror image swaps the side the name refers to.
POSITIONAL_WORDS = frozenset(
    {
        "left",
        "right",
        "anterior",
        "posterior",
        "superior",
        "inferior",
        "upper",
        "lower",
        "medial",
        "lateral",
        "proximal",
        "distal",
        "dorsal",
        "ventral",
        "cranial",
        "caudal",
    }
)


def is_positional(concept: str) -> bool:
    """True when the concept's name has a side or position word (``"Left kidney"`` -> True)."""
    return bool(set(re.findall(r"[a-z]+", concept.lower())) & POSITIONAL_WORDS)


def normalize_term(name: str) -> str:
    """Normalised label name: ``"Kidney_L"`` -> ``"left kidney"``, ``"liver+tumour"`` -> ``"liver tumor"``."""
    text = str(name).strip().casefold()
    text = re.sub(r"[_+\s]+", " ", text).strip()
    words = [_US_SPELLING.get(w, w) for w in text.split(" ") if w]
    sides = [i for i, w in enumerate(words) if w in _SIDES]
    if len(sides) == 1:
        i = sides[0]
        side = _SIDES[words[i]]
        words = [side] + words[:i] + words[i + 1 :]
    return " ".join(words)


def _words(name: str) -> set[str]:
    return set(re.sub(r"[^0-9a-z]+", " ", str(name).casefold()).split())


#: Relation words that cut a prompt sentence into phrases (:meth:`Vocabulary.match_sentence`).
PHRASE_BREAKS = frozenset(
    {
        "of",
        "in",
        "within",
        "inside",
        "on",
        "at",
        "from",
        "into",
        "onto",
        "around",
        "surrounding",
        "near",
        "adjacent",
        "beside",
        "along",
        "across",
        "between",
        "involving",
        "affecting",
        "showing",
        "shows",
        "depicting",
        "visible",
        "seen",
        "located",
        "for",
        "with",
        "without",
        "under",
        "over",
        "by",
        "through",
        "throughout",
        "via",
        "using",
        "as",
    }
)
_SIDE_WORDS = ("left", "right")


def sentence_words(text: str) -> list[str]:
    """The words of a sentence or term (rule 1 of the module docstring): lower-case runs of letters and
    digits, British spellings made US."""
    return [_US_SPELLING.get(w, w) for w in re.findall(r"[a-z0-9]+", str(text).casefold())]


def _same_word(word: str, term_word: str) -> bool:
    """``word`` is ``term_word`` or one of its plurals (rule 3 of the module docstring)."""
    t = term_word
    if word == t or word in (t + "s", t + "es"):
        return True
    return (
        (t.endswith("y") and word == t[:-1] + "ies")
        or (t.endswith("a") and word == t + "e")
        or (t.endswith("us") and len(t) > 4 and word == t[:-2] + "i")
    )


def singular_forms(term: str) -> list[str]:
    """Candidate singulars of a normalised term, its last word made singular (rule 3 of the module
    docstring): ``"polyps"`` -> ``["polyp"]``, ``"arteries"`` -> ``["artery", "arterie", "arteri"]``,
    ``"hippocampi"`` -> ``["hippocampus"]``, ``"vertebrae"`` -> ``["vertebra"]``; ``[]`` for short words."""
    head, _, last = term.rpartition(" ")
    if len(last) < 3:
        return []
    forms = []
    if last.endswith("ies"):
        forms.append(last[:-3] + "y")
    if last.endswith("s") and not last.endswith("ss"):
        forms.append(last[:-1])
    if last.endswith("es"):
        forms.append(last[:-2])
    if last.endswith("i"):
        forms.append(last[:-1] + "us")
    if last.endswith("ae"):
        forms.append(last[:-1])
    prefix = f"{head} " if head else ""
    return [prefix + f for f in dict.fromkeys(forms)]


@dataclass(frozen=True)
class SentenceMatch:
    """What :meth:`Vocabulary.match_sentence` made of a sentence.

    Attributes:
        text: the sentence as given.
        concept: the canonical concept, or ``None`` (unmapped: use ``text`` as written).
        matched: the sentence's words that named it (``None`` when unmapped).
        rule: ``"term"``, ``"term+context"`` (rule 5), ``"term+side"`` (rule 6) or ``"unmapped"``.
    """

    text: str
    concept: str | None
    matched: str | None = None
    rule: str = "unmapped"

    @property
    def used(self) -> str:
        """The prompt to give the model: the concept, or the sentence itself when unmapped."""
        return self.concept if self.concept is not None else self.text

    def to_dict(self) -> dict[str, str | None]:
        return {"text": self.text, "concept": self.concept, "matched": self.matched, "rule": self.rule}


@dataclass(frozen=True)
class Resolved:
    """The concept a label name maps to; ``known`` is False when no vocabulary entry matched."""

    name: str
    concept: str
    known: bool
    scope: str | None = None


@dataclass
class Vocabulary:
    """Canonical terms, their synonyms and dataset-scoped names.

    Attributes:
        concepts: canonical term -> list of synonyms (as written in the file).
        datasets: scope key -> {label name -> canonical term}.
    """

    concepts: dict[str, list[str]] = field(default_factory=dict)
    datasets: dict[str, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._index: dict[str, str] = {}
        for canon in self.concepts:
            self._index[normalize_term(canon)] = canon
        for canon, synonyms in self.concepts.items():
            for s in synonyms:
                self._index.setdefault(normalize_term(s), canon)
        self._scoped = {
            key: {normalize_term(n): c for n, c in names.items()} for key, names in self.datasets.items()
        }
        self._terms: list[tuple[tuple[str, ...], str]] = []
        seen: set[tuple[str, ...]] = set()
        for norm, canon in self._index.items():  # canonical terms first, then synonyms (as _index)
            words = tuple(sentence_words(norm))
            if words and words not in seen:
                seen.add(words)
                self._terms.append((words, canon))

    # -- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, doc: Mapping, source: str | Path | None = None) -> Vocabulary:
        """Build from the JSON form ``{"concepts": {term: [synonyms]}, "datasets": {key: {name: term}}}``."""
        concepts = doc.get("concepts", {})
        datasets = doc.get("datasets", {})
        if not isinstance(concepts, Mapping) or not isinstance(datasets, Mapping):
            raise InputError(source, "a vocabulary needs 'concepts' and 'datasets' objects")
        clean: dict[str, list[str]] = {}
        for canon, syn in concepts.items():
            if isinstance(syn, str):
                syn = [syn]
            if not isinstance(syn, list) or not all(isinstance(s, str) for s in syn):
                raise InputError(source, f"synonyms of concept {canon!r} must be a list of strings")
            clean[normalize_term(canon)] = list(syn)
        scoped: dict[str, dict[str, str]] = {}
        for key, names in datasets.items():
            if not isinstance(names, Mapping):
                raise InputError(source, f"dataset terms of {key!r} must be an object name -> concept")
            scoped[str(key)] = {str(n): normalize_term(c) for n, c in names.items()}
        return cls(clean, scoped)

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary JSON file."""
        return cls.from_dict(read_json(path, "vocabulary file"), Path(path))

    @classmethod
    def bundled(cls) -> Vocabulary:
        """The vocabulary shipped with the package."""
        return cls.load(BUNDLED_VOCABULARY)

    @classmethod
    def default(cls, user_file: str | Path | None = None) -> Vocabulary:
        """The bundled vocabulary, with ``user_file`` merged over it when given."""
        vocab = cls.bundled()
        return vocab.merged(cls.load(user_file)) if user_file else vocab

    def merged(self, other: Vocabulary) -> Vocabulary:
        """A new vocabulary: this one with ``other``'s concepts, synonyms and dataset terms laid over it.

        A synonym that ``other`` assigns to a concept is removed from any other concept here.
        """
        theirs = {normalize_term(s) for syns in other.concepts.values() for s in syns}
        concepts = {
            c: [s for s in syns if normalize_term(s) not in theirs] for c, syns in self.concepts.items()
        }
        for c, syns in other.concepts.items():
            concepts[c] = concepts.get(c, []) + [s for s in syns if s not in concepts.get(c, [])]
        datasets = {k: dict(v) for k, v in self.datasets.items()}
        for k, v in other.datasets.items():
            datasets.setdefault(k, {}).update(v)
        return Vocabulary(concepts, datasets)

    def to_dict(self) -> dict:
        return {"version": 1, "concepts": self.concepts, "datasets": self.datasets}

    # -- lookup --------------------------------------------------------------------------------------
    def is_concept(self, term: str) -> bool:
        """True when ``term`` is a canonical concept of this vocabulary."""
        return term in self.concepts

    def scopes_for(self, dataset_names: Iterable[str]) -> list[str]:
        """Scope keys that apply to a dataset known by any of ``dataset_names`` (longest keys first)."""
        names = [_words(n) for n in dataset_names if n]
        keys = [k for k in self._scoped if any(_words(k) <= w for w in names)]
        return sorted(keys, key=lambda k: (-len(_words(k)), k))

    def resolve(self, name: str, dataset: str | Iterable[str] | None = None) -> Resolved:
        """Map one label name to its concept (see the module docstring for the rules)."""
        norm = normalize_term(name)
        names = [dataset] if isinstance(dataset, str) else list(dataset or [])
        for key in self.scopes_for(names):
            hit = self._scoped[key].get(norm)
            if hit is not None:
                return Resolved(str(name), hit, True, key)
        for candidate in (norm, *singular_forms(norm)):
            if candidate in self._index:
                return Resolved(str(name), self._index[candidate], True)
        return Resolved(str(name), norm, False)

    def concept(self, name: str, dataset: str | Iterable[str] | None = None) -> str:
        """The canonical term for ``name`` (the normalised name itself when unknown)."""
        return self.resolve(name, dataset).concept

    # -- prompt sentences ----------------------------------------------------------------------------
    def _phrase_matches(self, phrase: list[str]) -> list[tuple[int, int, str]]:
        """``(start, length, concept)`` of the terms taken from ``phrase`` left to right, the longest at
        each word, none overlapping (rules 3 and 4)."""
        taken = []
        start = 0
        while start < len(phrase):
            best: tuple[int, str] | None = None
            for words, canon in self._terms:
                n = len(words)
                if (best is None or n > best[0]) and start + n <= len(phrase):
                    if all(_same_word(phrase[start + k], words[k]) for k in range(n)):
                        best = (n, canon)
            if best is None:
                start += 1
            else:
                taken.append((start, best[0], best[1]))
                start += best[0]
        return taken

    def _known(self, text: str) -> str | None:
        hit = self.resolve(text)
        return hit.concept if hit.known else None

    def match_sentence(self, text: str) -> SentenceMatch:
        """The concept a prompt sentence names (rules in the module docstring), or an unmapped result.

        >>> Vocabulary.bundled().match_sentence("CT imaging of the spleen within the abdomen").concept
        'spleen'
        """
        phrases: list[list[str]] = [[]]
        for word in sentence_words(text):
            if word in PHRASE_BREAKS:
                if phrases[-1]:
                    phrases.append([])
            else:
                phrases[-1].append(word)
        chosen = None
        for i, phrase in enumerate(phrases):
            matches = self._phrase_matches(phrase)
            if matches:
                start, n, concept = max(matches, key=lambda m: (m[1], m[0]))
                chosen = (i, start, n, concept)
                break
        if chosen is None:
            return SentenceMatch(str(text), None)
        i, start, n, concept = chosen
        phrase = phrases[i]
        matched = " ".join(phrase[start : start + n])
        if i + 1 < len(phrases):
            context = self._phrase_matches(phrases[i + 1])
            if context:
                other = max(context, key=lambda m: (m[1], m[0]))[2]
                combined = self._known(f"{other} {concept}")
                if combined is not None and combined != concept:
                    return SentenceMatch(str(text), combined, f"{matched} ... {other}", "term+context")
        outside = phrase[:start] + phrase[start + n :]
        sides = [w for w in outside if w in _SIDE_WORDS]
        if len(sides) == 1 and not any(w in _SIDE_WORDS for w in concept.split()):
            sided = f"{sides[0]} {concept}"
            if self.is_concept(sided):
                return SentenceMatch(str(text), sided, f"{matched} ({sides[0]})", "term+side")
        return SentenceMatch(str(text), concept, matched, "term")
