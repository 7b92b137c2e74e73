"""mpafer: Multimodal Prompt Alignment for Facial Expression Recognition (MPA-FER, arXiv 2506.21017).

The library is plain, typed Python with no Prefect imports; ``flows/`` orchestrates it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    #: The version defined once, in ``pyproject.toml``, as the installed package's metadata records it.
    __version__ = version("mpafer")
except PackageNotFoundError:  # a checkout on PYTHONPATH that was never installed
    __version__ = "0+unknown"
