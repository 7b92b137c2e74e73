"""mpafer: Multimodal Prompt Alignment for Facial Expression Recognition (MPA-FER, arXiv 2506.21017).

The library is plain, typed Python with no Prefect imports; ``flows/`` orchestrates it.
"""

__version__ = "0.1.0"
