"""The protocols prompt-learning papers report, as one study over the pipeline's own stages (docs/STUDY.md).

- ``derive.py``: derived manifests (few-shot subsets, the rows of some classes).
- ``steps.py``: the study's own content-keyed steps (subset, transfer, aggregate).
- ``design.py``: the settings, one cell per variant × seed × setting, and the graph of steps.
- ``runner.py``: the plain-Python runner (``mpafer study --no-prefect``); ``flows/study.py`` is the flow.
- ``table.py`` and ``report.py``: mean ± std and Student-t intervals per row, the plot, the report.
"""

from mpafer.study.runner import run_study

__all__ = ["run_study"]
