"""Volumes ``(Z, Y, X)``: reoriented to LPS, cut into slices along the acquisition axis, segmented in 3D.

Modules, in the order of the flow:

* :mod:`~medsam3.predict.volume.prompts`: :class:`VolumePrompt` (text, key-slice box, 3D box) and its
  command-line parsing;
* :mod:`~medsam3.predict.volume.plan`: the request checked and planned before any model work (slices
  searched per prompt, intensity groups);
* :mod:`~medsam3.predict.volume.slices`: ``slices`` mode, vision features in batches of slices shared by
  every prompt, the per-slice rule;
* :mod:`~medsam3.predict.volume.track`: ``track`` mode, SAM3's video model carrying a concept through the
  slices with bounded memory;
* :mod:`~medsam3.predict.volume.post`: presence over slices, key-slice chains, holes, 3D components, one
  label map;
* :mod:`~medsam3.predict.volume.segment`: orchestration and the exact inverse to the input grid;
* :mod:`~medsam3.predict.volume.outputs`: NIfTI / NRRD / MHA / npz / DICOM SEG in the input's geometry.
"""
