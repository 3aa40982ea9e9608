"""The ``ivon-diag`` command line and the demo: the one entry that imports every layer (the product's
ivon_core, sensitivity, worker and app, and the research harness for ``validate``)."""
