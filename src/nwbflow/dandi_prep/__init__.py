"""DANDI submission prep: what would block upload, with the fix, and the files under DANDI's names.

Plain functions, no Prefect (the ``dandi-prep`` flow in ``nwbflow.flows.dandi``
runs them as tasks). NWB is read and written only through ``nwbflow.nwb_io``;
dandi's own code decides what blocks upload and what the names are.

Modules: ``plan`` (find files, check each as it is, plan names and metadata
across files), ``metadata`` (``meta.yaml``: supplied values, which file gets
which), ``fixes`` (every blocker -> its fix), ``naming`` (dandi organize's
names), ``assets`` (patch, judge and place one asset), ``organize`` (hard
links, copies, staged patched copies), ``report`` (JSON, markdown, table rows),
``model`` (the records passed between steps).
"""
