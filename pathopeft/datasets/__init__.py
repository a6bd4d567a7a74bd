"""Dataset-specific code: label spaces, tile tables and the builders that turn a public dataset into inputs
the generic stages read (e.g. :mod:`pathopeft.datasets.lc25000`: LC25000 lung tiles → MIL bags;
:mod:`pathopeft.datasets.monuseg` and :mod:`pathopeft.datasets.glas`: segmentation manifests)."""
