"""Prefect flows: process_session (one session) and nightly (a data root).

Flow docstrings use Google-style ``Args:`` sections (not numpydoc): Prefect reads
them to describe each parameter in the UI's run form.
"""

import logging

# The nwbflow loggers are attached to Prefect's API handler (PREFECT_LOGGING_EXTRA_LOGGERS=nwbflow);
# without a level of their own they inherit the root's WARNING and INFO lines never reach the UI.
logging.getLogger("nwbflow").setLevel(logging.INFO)
