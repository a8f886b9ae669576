"""Per-case prompts of ``medsam3 segment``: where a case's prompts come from, their label ids, instance tasks.

Sources, first that applies (as Medical SAM3's 3D inference, ``medical/inference_3d.py``):

1. the command line: ``-p TEXT`` (with ``--box`` ...), the same for every case; ``-p LABEL=TEXT`` gives the
   prompt the label id ``LABEL`` (give one to every ``-p`` or to none; without, prompt ``i`` is ``i + 1``);
2. ``--prompts-json FILE`` (:class:`PromptsTable`): a direct map ``{"1": "liver", "2": "spleen"}`` (every
   key an integer, ``instance_label`` aside) for every case, or a map keyed by the case's file name
   (``CT_x.npz``), then by its name (``CT_x``, the file name without extension), whose values are a text
   (label 1) or ``{"<label>": text, ..., "instance_label": 0|1}``;
3. the ``text_prompts`` stored in a BiomedSegFM / challenge npz (:func:`medsam3.io.npz.read_text_prompts`).

A case that no source gives a prompt is an error of that case alone (the others go on). Label ids are
normalised as ``str(int(key))`` > 0; texts are stripped and must not be empty; prompts of files and JSON are
used in ascending label order.

Label ids and instances (:func:`apply_case_prompts`): the segmenter numbers prompt ``i`` as ``i + 1``; the
label map is renumbered so that each prompt's voxels carry its label id (``uint8``, ``uint16`` past 255).
An **instance task** (``instance_label: 1``, exactly one text prompt) takes the prompt's binary mask and
splits it into 6-connected components (``scipy.ndimage.label`` with the face-connectivity structure; 4-
connected in 2D), numbered ``1..K`` in scan order (the order of each component's first voxel in the
array), one label entry per instance (``"<prompt> #k"``).

The normaliser (``--normalize-prompts``, :meth:`medsam3.data.vocabulary.Vocabulary.match_sentence`) maps
each text to a vocabulary concept; an unmapped text is used as written. Nothing is ever dropped.

Each case's JSON gets a ``case`` record (:meth:`CasePrompts.record`): ``prompt_source``, ``prompt_detail``,
``prompts`` (label id -> the text given to the model), ``label_ids`` (the prompts' ids; an instance task's
label map holds its instances ``1..K`` instead), ``instance``, ``instances`` (the number of instances of an
instance task, else ``None``), ``normalized`` (label id -> ``text``, ``concept`` or ``None`` when unmapped,
``matched``, ``rule``; only with the normaliser) and ``seconds`` (the case's wall time: reading and
segmenting; the outputs are written after it is recorded).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsam3.errors import InputError, PromptError
from medsam3.io.npz import TextPrompts, instance_flag, parse_text_prompts, read_text_prompts
from medsam3.predict.prompts import Prompt
from medsam3.predict.volume.prompts import VolumePrompt

if TYPE_CHECKING:
    from medsam3.data.vocabulary import SentenceMatch, Vocabulary
    from medsam3.predict.summary import LabelEntry, SegmentationResult

#: Where a case's prompts came from (``case.prompt_source`` in its JSON).
SOURCE_CLI = "command line"
SOURCE_JSON = "prompts JSON"
SOURCE_FILE = "npz text_prompts"

_LABELLED = re.compile(r"^\s*(\d+)\s*=\s*(\S.*)$", re.DOTALL)


def split_label_ids(items: Sequence[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[int] | None]:
    """Command-line prompt items with ``-p LABEL=TEXT`` split: ``(items with the bare texts, label ids)``.

    Label ids are ``None`` when no ``-p`` carries one. Raises :class:`PromptError` when only some do, when
    one is 0 or given twice, or when a geometry-only prompt (``--box`` before any ``-p``) would have none.
    """
    out: list[tuple[str, str]] = []
    ids: list[int | None] = []
    leading_geometry = False
    for kind, raw in items:
        if kind != "text":
            leading_geometry = leading_geometry or not ids
            out.append((kind, raw))
            continue
        m = _LABELLED.match(str(raw))
        ids.append(int(m.group(1)) if m else None)
        out.append((kind, m.group(2) if m else raw))
    given = [i for i in ids if i is not None]
    if not given:
        return out, None
    if len(given) != len(ids) or leading_geometry:
        raise PromptError(
            "give a label id to every prompt (-p LABEL=TEXT) or to none; a --box before any -p makes a "
            "prompt without one"
        )
    if 0 in given:
        raise PromptError("-p 0=...: label 0 is the background; label ids are integers > 0")
    twice = sorted({i for i in given if given.count(i) > 1})
    if twice:
        raise PromptError(f"label id {twice[0]} is given to two prompts")
    return out, given


@dataclass(frozen=True)
class PromptsTable:
    """``--prompts-json``: one prompt set for every case (``direct``) or sets by file name / case name."""

    path: Path
    direct: TextPrompts | None = None
    by_key: dict[str, TextPrompts] = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> PromptsTable:
        """Read and check the whole file (module docstring for the forms).

        Raises:
            InputError: naming the file: not JSON, not an object, or an entry that is not a valid prompt set.
        """
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise InputError(path, f"cannot read the prompts JSON ({exc})") from None
        if not isinstance(doc, dict) or not doc:
            raise InputError(path, 'the prompts JSON must be a non-empty object, e.g. {"1": "liver"}')
        keys = [k for k in doc if k != "instance_label"]
        if keys and all(re.fullmatch(r"\s*\d+\s*", k) for k in keys):
            return cls(path, direct=parse_text_prompts(doc, path, "prompts JSON"))
        if "instance_label" in doc:
            instance_flag(doc["instance_label"], path, "prompts JSON")  # a stray flag: still checked
        by_key = {
            str(key): parse_text_prompts(value, path, f"prompts JSON entry {key!r}")
            for key, value in doc.items()
            if key != "instance_label"
        }
        return cls(path, by_key=by_key)

    def lookup(self, path: Path, name: str) -> tuple[str, TextPrompts] | None:
        """``(key, prompts)`` for the case ``path`` named ``name``, or ``None`` when the file has none."""
        if self.direct is not None:
            return "(every case)", self.direct
        for key in (path.name, name):
            if key in self.by_key:
                return key, self.by_key[key]
        return None


@dataclass(frozen=True)
class CasePrompts:
    """The prompts one case is segmented with.

    Attributes:
        texts: per prompt, the text given to the model (after the normaliser); ``None`` for a geometry-only
            command-line prompt.
        label_ids: per prompt, its value in the label map (ascending for files and JSON).
        source: :data:`SOURCE_CLI`, :data:`SOURCE_JSON` or :data:`SOURCE_FILE`.
        detail: the JSON file and key, or the npz, the prompts were read from.
        instance: an instance task (module docstring).
        matches: per prompt, what the normaliser made of it (``None`` without the normaliser, or for a prompt
            without text).
    """

    texts: tuple[str | None, ...]
    label_ids: tuple[int, ...]
    source: str
    detail: str | None = None
    instance: bool = False
    matches: tuple[SentenceMatch | None, ...] | None = None

    @property
    def default_ids(self) -> bool:
        """Label ids are ``1..N`` in prompt order (the segmenter's own numbering)."""
        return list(self.label_ids) == list(range(1, len(self.label_ids) + 1))

    def prompts(
        self, cli_prompts: Sequence[Prompt | VolumePrompt] | None, volume: bool
    ) -> list[Prompt | VolumePrompt]:
        """The prompt objects: the command line's (texts replaced by :attr:`texts`), or text prompts."""
        if self.source == SOURCE_CLI:
            assert cli_prompts is not None
            return [dataclasses.replace(p, text=t) for p, t in zip(cli_prompts, self.texts, strict=True)]
        kind = VolumePrompt if volume else Prompt
        return [kind(text=t) for t in self.texts]

    def record(self, instances: int | None = None, seconds: float | None = None) -> dict[str, Any]:
        """The ``case`` record of the case's JSON (module docstring)."""
        out: dict[str, Any] = {
            "prompt_source": self.source,
            "prompt_detail": self.detail,
            "prompts": {str(i): t for i, t in zip(self.label_ids, self.texts, strict=True)},
            "label_ids": list(self.label_ids),
            "instance": self.instance,
            "instances": instances,
        }
        if self.matches is not None:
            out["normalized"] = {
                str(i): (m.to_dict() if m is not None else None)
                for i, m in zip(self.label_ids, self.matches, strict=True)
            }
        if seconds is not None:
            out["seconds"] = round(float(seconds), 3)
        return out


@dataclass(frozen=True)
class PromptSources:
    """What one run offers every case: the command line's prompts, the prompts JSON, the normaliser.

    ``items`` are the command-line prompt items with ``LABEL=`` removed (:func:`split_label_ids`), empty
    when no ``-p`` / ``--box`` was given.
    """

    items: tuple[tuple[str, str], ...] = ()
    label_ids: tuple[int, ...] | None = None
    table: PromptsTable | None = None
    vocabulary: Vocabulary | None = None

    @classmethod
    def from_args(
        cls,
        items: Sequence[tuple[str, str]] | None,
        prompts_json: str | Path | None = None,
        normalize: bool = False,
    ) -> PromptSources:
        """Parse ``-p LABEL=TEXT``, load ``--prompts-json`` and the vocabulary (all checked here, before
        any case is read)."""
        bare, ids = split_label_ids(list(items or []))
        table = PromptsTable.load(prompts_json) if prompts_json is not None else None
        vocabulary = None
        if normalize:
            from medsam3.data.vocabulary import Vocabulary

            vocabulary = Vocabulary.bundled()
        return cls(tuple(bare), None if ids is None else tuple(ids), table, vocabulary)

    @property
    def from_cli(self) -> bool:
        """Every case takes the command line's prompts."""
        return bool(self.items)

    def for_case(
        self, path: str | Path, name: str, cli_prompts: Sequence[Prompt | VolumePrompt] | None = None
    ) -> CasePrompts:
        """The prompts of the case ``path`` named ``name`` (module docstring); ``cli_prompts``: the command
        line's prompt objects, parsed for this kind of case (2D or volume).

        Raises:
            PromptError: no source has prompts for the case; an instance task without exactly one prompt.
            InputError: the npz's ``text_prompts`` cannot be read or are malformed (naming the file).
        """
        path = Path(path)
        if self.from_cli:
            assert cli_prompts is not None
            ids = self.label_ids or tuple(range(1, len(cli_prompts) + 1))
            if len(ids) != len(cli_prompts):
                raise PromptError("give a label id to every prompt (-p LABEL=TEXT) or to none")
            return self._normalized(
                CasePrompts(tuple(p.text for p in cli_prompts), tuple(ids), SOURCE_CLI, "-p")
            )
        found: tuple[str, str, TextPrompts] | None = None
        hit = self.table.lookup(path, name) if self.table is not None else None
        if hit is not None:
            assert self.table is not None
            found = (SOURCE_JSON, f"{self.table.path} [{hit[0]}]", hit[1])
        elif path.is_file() and path.name.lower().endswith(".npz"):
            stored = read_text_prompts(path)
            if stored is not None:
                found = (SOURCE_FILE, str(path), stored)
        if found is None:
            where = f", or an entry for {path.name!r} in {self.table.path}" if self.table is not None else ""
            raise PromptError(
                f"{path}: no prompt for this case: give -p TEXT (or -p LABEL=TEXT), --prompts-json FILE"
                f"{where}, or an npz with text_prompts"
            )
        source, detail, stored = found
        if stored.instance and len(stored.labels) != 1:
            raise PromptError(
                f"{detail}: instance_label is 1 but {len(stored.labels)} prompts are given; an instance task "
                "has exactly one text prompt"
            )
        labels = sorted(stored.labels.items())
        case = CasePrompts(
            tuple(t for _, t in labels), tuple(i for i, _ in labels), source, detail, stored.instance
        )
        return self._normalized(case)

    def _normalized(self, case: CasePrompts) -> CasePrompts:
        if self.vocabulary is None:
            return case
        matches = tuple(None if t is None else self.vocabulary.match_sentence(t) for t in case.texts)
        texts = tuple(t if m is None else m.used for t, m in zip(case.texts, matches, strict=True))
        return dataclasses.replace(case, texts=texts, matches=matches)


# --------------------------------------------------------------------------------------------------
# label ids and instances on a result


def _entry_extent(entry: LabelEntry, mask_slices: tuple[slice, ...], count: int, result: Any) -> LabelEntry:
    """``entry`` with the size and extent of one component (``mask_slices`` from ``find_objects``)."""
    ref = result.reference
    known = ref.meta.get("spacing_known", True) is not False
    if len(mask_slices) == 3:
        z, y, x = mask_slices
        box3d = (x.start, y.start, z.start, x.stop, y.stop, z.stop)
        ml = count * ref.voxel_volume_ml if known and entry.volume_ml is not None else None
        return dataclasses.replace(
            entry, voxels=count, volume_ml=ml, box3d=box3d, slice_range=(z.start, z.stop - 1)
        )
    y, x = mask_slices
    pixel_mm2 = float(np.prod(ref.spacing[:2])) if known else None
    return dataclasses.replace(
        entry,
        area_px=count,
        area_mm2=None if pixel_mm2 is None else count * pixel_mm2,
        box=(x.start, y.start, x.stop, y.stop),
    )


def split_instances(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``(instances, K)``: a binary mask ``(D, H, W)`` (or ``(H, W)``) split into 6-connected (4 in 2D)
    components numbered ``1..K`` in scan order, in the smallest unsigned dtype."""
    from scipy import ndimage

    from medsam3.io.readers import smallest_unsigned

    mask = np.asarray(mask, dtype=bool)
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    labelled, count = ndimage.label(mask, structure=structure)
    return labelled.astype(smallest_unsigned(int(count)), copy=False), int(count)


def apply_case_prompts(
    result: SegmentationResult, case: CasePrompts
) -> tuple[SegmentationResult, int | None]:
    """``(result with the case's label ids or instances, number of instances or None)`` (module docstring).

    The label map keeps the input's grid and array layout; entries take the new values (instance tasks:
    one entry per instance, or the prompt's absent entry with value ``None`` when nothing was found).

    Raises:
        PromptError: label ids other than ``1..N`` on a 2D result numbered by instance (``--instances``).
    """
    from medsam3.io.readers import smallest_unsigned

    labels = np.asarray(result.label_map)
    if case.instance:
        entry = result.labels[0]  # one prompt (PromptSources.for_case): every entry is about it
        instances, count = split_instances(labels > 0)
        if count == 0:
            entries = [dataclasses.replace(entry, value=None)]
        else:
            from scipy import ndimage

            sizes = np.bincount(instances.ravel(), minlength=count + 1)
            entries = [
                _entry_extent(
                    dataclasses.replace(entry, value=k, instance=k, absent=False, reason=None),
                    sl,
                    int(sizes[k]),
                    result,
                )
                for k, sl in enumerate(ndimage.find_objects(instances), start=1)
            ]
        return dataclasses.replace(result, label_map=instances, labels=entries), count
    if case.default_ids:
        return result, None
    if any(e.instance is not None for e in result.labels):
        raise PromptError("label ids (-p LABEL=TEXT, prompts JSON, npz) cannot number --instances results")
    ids = list(case.label_ids)
    lut = np.zeros(max(int(labels.max()) if labels.size else 0, len(ids)) + 1, dtype=np.int64)
    lut[1 : len(ids) + 1] = ids
    remapped = lut[labels].astype(smallest_unsigned(max(ids)), copy=False)
    entries = [
        e if e.value is None else dataclasses.replace(e, value=ids[e.prompt_index]) for e in result.labels
    ]
    return dataclasses.replace(result, label_map=remapped, labels=entries), None
