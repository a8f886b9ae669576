"""The concepts a model was trained on: ``concepts.json`` in a model folder, and how prompts match them.

A model that learnt a few concepts from scratch (the bundled ``medsam3-nano``) has no notion of anything
else: asked for "liver" on an ultrasound image it answers with the concept it knows best, confidently.
Its folder therefore records what it knows, and the segmenter reports any other prompt as absent with the
reason ``unknown concept`` instead of segmenting it (:mod:`medsam3.predict.vocabulary_guard`). Models
without the file (SAM3, Medical SAM3: open vocabulary) segment every prompt as written.

The file (``concepts.json`` beside ``config.json``)::

    {"format": "medsam3 concepts", "version": 1,
     "open_vocabulary": false,
     "concepts": {"fetal head": ["foetal head", "fh"], "polyp": ["polyps", "colon polyp"], ...},
     "trained_on": {"manifest": "manifest.jsonl", "split": "train",
                    "datasets": {"HC18": ["fetal head"], ...}, "base": "tiny"}}

``concepts`` maps each canonical concept (:mod:`medsam3.data.vocabulary`) to synonyms that also name it;
``open_vocabulary`` true records the concepts a model was fine-tuned on without restricting its prompts
(fine-tuning an open-vocabulary SAM3 keeps what it knew). ``trained_on`` is provenance only.

``medsam3 train`` writes the file into every export (:func:`record_trained_concepts`): the concepts present
(with foreground) in the training split of the manifest, with their synonyms from the vocabulary; a run
that starts from a model with a closed vocabulary adds that model's concepts; a run that starts from an
open-vocabulary model (a folder or Hub id without the file) writes ``open_vocabulary: true``.

Matching a prompt text to a concept (:meth:`ModelConcepts.match`), first rule that applies:

1. ``concept``: the normalised text (:func:`~medsam3.data.vocabulary.normalize_term`) is one of the concepts;
2. ``synonym``: the vocabulary (the bundled one with the model's own synonyms laid over it) resolves the
   text to one of the concepts, plurals included ("foetal head", "hippocampi", "colon polyp");
   a text the vocabulary resolves to another concept ("liver") is unknown;
3. ``sentence``: the vocabulary's sentence rule (:meth:`~medsam3.data.vocabulary.Vocabulary.match_sentence`)
   names one of the concepts ("Visualization of the hippocampus in MRI"), unless a side or position word
   (``left``, ``anterior``, ... :data:`~medsam3.data.vocabulary.POSITIONAL_WORDS`) outside the matched words
   asks for a part the model does not know ("left hippocampus");
4. otherwise ``unknown``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medsam3.data.vocabulary import POSITIONAL_WORDS, Vocabulary, normalize_term, sentence_words
from medsam3.errors import InputError
from medsam3.io.atomic import write_text_atomic
from medsam3.io.jsonfile import read_json
from medsam3.model.folder_files import model_file

if TYPE_CHECKING:
    from medsam3.data.manifest import Record

log = logging.getLogger(__name__)

#: The file name in a model folder.
CONCEPTS_FILE = "concepts.json"
FORMAT = "medsam3 concepts"
VERSION = 1
#: ``model.source`` values of ``medsam3 train`` that start from random weights.
RANDOM_SOURCES = ("tiny", "small")


@dataclass(frozen=True)
class ConceptMatch:
    """What :meth:`ModelConcepts.match` made of one prompt text.

    Attributes:
        text: the prompt text as given.
        concept: the model's concept it names, or ``None`` (unknown to the model).
        rule: ``"concept"``, ``"synonym"``, ``"sentence"`` or ``"unknown"`` (module docstring).
    """

    text: str
    concept: str | None
    rule: str

    @property
    def known(self) -> bool:
        return self.concept is not None

    def to_dict(self) -> dict[str, str | None]:
        return {"text": self.text, "concept": self.concept, "rule": self.rule}


@dataclass(frozen=True)
class ModelConcepts:
    """The concepts of one model (module docstring).

    Attributes:
        concepts: canonical concept -> synonyms, in the file's order.
        open_vocabulary: the model takes any prompt; the concepts are what it was fine-tuned on.
        trained_on: provenance (manifest name, split, datasets and their concepts, base model).
        path: the file it was read from (``None`` when built in memory).
    """

    concepts: Mapping[str, Sequence[str]]
    open_vocabulary: bool = False
    trained_on: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None

    # -- reading and writing ------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, doc: Any, path: str | Path | None = None) -> ModelConcepts:
        """Build from the JSON form (module docstring).

        Raises:
            InputError: naming ``path``: not an object, another format or version, no concepts, a concept
                that is not a non-empty text, synonyms that are not a list of texts.
        """
        where = Path(path) if path is not None else None
        if not isinstance(doc, Mapping):
            raise InputError(where, "a concepts file must be a JSON object")
        if doc.get("format", FORMAT) != FORMAT:
            raise InputError(where, f"not a concepts file: format {doc.get('format')!r}, expected {FORMAT!r}")
        if doc.get("version", VERSION) != VERSION:
            raise InputError(where, f"concepts file version {doc.get('version')!r} is not supported")
        raw = doc.get("concepts")
        if not isinstance(raw, Mapping) or not raw:
            raise InputError(where, "'concepts' must be a non-empty object: concept -> list of synonyms")
        concepts: dict[str, list[str]] = {}
        for name, synonyms in raw.items():
            concept = normalize_term(name)
            if not concept:
                raise InputError(where, f"concept {name!r} is empty")
            if not isinstance(synonyms, list) or not all(isinstance(s, str) for s in synonyms):
                raise InputError(where, f"synonyms of concept {name!r} must be a list of strings")
            concepts[concept] = list(dict.fromkeys(s for s in synonyms if s.strip()))
        open_vocabulary = doc.get("open_vocabulary", False)
        if not isinstance(open_vocabulary, bool):
            raise InputError(where, "'open_vocabulary' must be true or false")
        trained_on = doc.get("trained_on") or {}
        if not isinstance(trained_on, Mapping):
            raise InputError(where, "'trained_on' must be an object")
        return cls(concepts, open_vocabulary, dict(trained_on), where)

    @classmethod
    def load(cls, path: str | Path) -> ModelConcepts:
        """Read a concepts file (:class:`~medsam3.errors.InputError` naming it when it is not valid)."""
        return cls.from_dict(read_json(path, "concepts file"), path)

    @classmethod
    def of_model(cls, folder: str | Path | None) -> ModelConcepts | None:
        """The concepts recorded in a model folder, or ``None`` when it records none (open vocabulary).

        Read once per file version (cached by path and modification time).
        """
        return model_file(folder, CONCEPTS_FILE, cls.load)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "open_vocabulary": self.open_vocabulary,
            "concepts": {c: list(s) for c, s in self.concepts.items()},
        }
        if self.trained_on:
            out["trained_on"] = dict(self.trained_on)
        return out

    def write(self, folder: str | Path) -> Path:
        """Write ``folder/concepts.json`` atomically; returns its path."""
        path = Path(folder) / CONCEPTS_FILE
        write_text_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    # -- what the model knows -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The concepts, sorted."""
        return sorted(self.concepts)

    @property
    def restricts(self) -> bool:
        """True when prompts outside the concepts are refused (a closed vocabulary)."""
        return not self.open_vocabulary

    @functools.cached_property
    def vocabulary(self) -> Vocabulary:
        """The bundled vocabulary with this model's concepts and synonyms laid over it."""
        own = Vocabulary({c: list(s) for c, s in self.concepts.items()}, {})
        return Vocabulary.bundled().merged(own)

    def match(self, text: str) -> ConceptMatch:
        """The model's concept that ``text`` names, or an unknown match (rules in the module docstring)."""
        text = str(text)
        if normalize_term(text) in self.concepts:
            return ConceptMatch(text, normalize_term(text), "concept")
        vocab = self.vocabulary
        resolved = vocab.resolve(text)
        if resolved.known:
            if resolved.concept in self.concepts:
                return ConceptMatch(text, resolved.concept, "synonym")
            return ConceptMatch(text, None, "unknown")
        sentence = vocab.match_sentence(text)
        if sentence.concept is not None and sentence.concept in self.concepts:
            named = set(sentence_words(sentence.matched or "")) | set(sentence.concept.split())
            extra = [w for w in sentence_words(text) if w in POSITIONAL_WORDS and w not in named]
            if not extra:
                return ConceptMatch(text, sentence.concept, "sentence")
        return ConceptMatch(text, None, "unknown")

    def describe(self) -> str:
        """``"fetal head, hippocampus, polyp"``: the concepts for a message."""
        return ", ".join(self.names)


# --------------------------------------------------------------------------------------------------
# training: the concepts of a manifest, written into each export


def trained_concepts(records: Iterable[Record], split: str = "train") -> dict[str, list[str]]:
    """Dataset -> concepts present (with foreground) in its ``split`` records, both sorted."""
    out: dict[str, set[str]] = {}
    for r in records:
        if r.split != split:
            continue
        present = {c for c, ranges in r.foreground.items() if ranges}
        if present:
            out.setdefault(r.dataset, set()).update(present)
    return {d: sorted(cs) for d, cs in sorted(out.items())}


def base_concepts(source: str) -> ModelConcepts | None:
    """The concepts recorded by the model a training run starts from: a folder's ``concepts.json``, a cached
    Hub model's; ``None`` when it records none (an open-vocabulary model) or cannot be looked up offline."""
    path = Path(source).expanduser()
    if path.is_dir():
        return ModelConcepts.of_model(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, CONCEPTS_FILE)
    except Exception:  # not a Hub id, or the cache cannot be read: nothing recorded
        return None
    return ModelConcepts.load(cached) if isinstance(cached, str) else None


def concepts_for_training(
    records: Iterable[Record],
    *,
    base_source: str,
    manifest_name: str | None = None,
    split: str = "train",
    vocabulary: Vocabulary | None = None,
) -> ModelConcepts:
    """The concepts an export of a training run records (module docstring).

    Args:
        records: the manifest records the run trains on (after its dataset filter).
        base_source: the run's ``model.source`` (:data:`RANDOM_SOURCES`, a folder or a Hub id).
        manifest_name: the manifest's file name, for provenance (no folder: exports travel).
        split: the split trained on.
        vocabulary: where synonyms come from (default: the bundled vocabulary).

    Raises:
        InputError: no concept has foreground in ``split``.
    """
    by_dataset = trained_concepts(records, split)
    learnt = sorted({c for cs in by_dataset.values() for c in cs})
    if not learnt:
        raise InputError(None, f"the manifest has no concept with foreground in split {split!r}")
    random_start = base_source in RANDOM_SOURCES
    base = None if random_start else base_concepts(base_source)
    open_vocabulary = not random_start and (base is None or base.open_vocabulary)
    vocab = vocabulary or Vocabulary.bundled()
    concepts: dict[str, list[str]] = {}
    if base is not None:
        concepts.update({c: list(s) for c, s in base.concepts.items()})
    for c in learnt:
        synonyms = concepts.setdefault(c, [])
        synonyms.extend(s for s in vocab.concepts.get(c, []) if s not in synonyms)
    trained_on: dict[str, Any] = {"split": split, "datasets": by_dataset}
    if manifest_name:
        trained_on = {"manifest": manifest_name, **trained_on}
    if random_start:
        trained_on["base"] = f"random weights ({base_source})"
    else:  # a Hub id is kept; a local folder is not (an export travels)
        trained_on["base"] = "a model folder" if Path(base_source).expanduser().is_dir() else base_source
    if base is not None:
        trained_on["base_concepts"] = base.names
    return ModelConcepts(dict(sorted(concepts.items())), open_vocabulary, trained_on)


def record_trained_concepts(export_dir: str | Path, cfg: Any) -> Path | None:
    """Write ``concepts.json`` into an export of the training run configured by ``cfg``
    (a :class:`~medsam3.train.config.TrainConfig`): the concepts of ``cfg.data.manifest`` (its
    ``cfg.data.datasets`` when given), on top of ``cfg.model.source``'s (module docstring).

    Returns the file, or ``None`` (with a warning) when the training split names no concept with
    foreground: the export then records none.
    """
    from medsam3.data.manifest import read_manifest

    records = read_manifest(cfg.data.manifest)
    if cfg.data.datasets:
        keep = set(cfg.data.datasets)
        records = [r for r in records if r.dataset in keep]
    try:
        concepts = concepts_for_training(
            records, base_source=str(cfg.model.source), manifest_name=Path(cfg.data.manifest).name
        )
    except InputError as exc:
        log.warning("%s: no %s written: %s", export_dir, CONCEPTS_FILE, exc)
        return None
    path = concepts.write(export_dir)
    kind = "open vocabulary, fine-tuned on" if concepts.open_vocabulary else "knows"
    log.info("%s: the model %s %s", path, kind, concepts.describe())
    return path
