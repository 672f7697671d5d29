"""Each ``personafuse <workflow>`` as a function of its composed config.

``recipes/<name>.py`` are the thin Hydra mains over these (``python recipes/<name>.py`` in a clone,
``personafuse <name>`` from the wheel); the pipeline chains them without one recipe importing another.
"""
