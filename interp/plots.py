"""Plotly figures. Functions take plain tensors, arrays and frames and return ``plotly.graph_objects.Figure``.

Results' ``.plot()`` methods import this module lazily, so analyses never depend on plotly at import time.
"""

from __future__ import annotations

import plotly.graph_objects as go  # noqa: F401
