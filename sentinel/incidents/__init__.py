"""Incidents: stack dumps (py-spy) and snapshot bundles, kept under a budget (issue 17).

watchdog / hang / operator -> Capturer -> PySpy (one dump per engine process)
                                       -> IncidentStore (directory per incident, oldest pruned)
snapshot -> SnapshotBuilder -> tar.gz in the same store
"""
