"""Images from a PACS and results back to it: DICOMweb (QIDO-RS, WADO-RS, STOW-RS) and an Orthanc node.

* :mod:`medsam3.pacs.dicomweb`: series references (``dicomweb+http://HOST/ROOT/studies/UID/series/UID``),
  credentials from the environment, a series downloaded to a folder (size-capped, checked complete) and
  DICOM files stored back;
* :mod:`medsam3.pacs.watch`: ``medsam3 watch``, which follows an Orthanc server's change feed, segments
  the series it selects and stores the results, with its progress in a small SQLite state file.
"""
