"""Grounded conversation: answer, then ground the answer's phrases; the visual chain of thought;
the keyword selector and its training; the CLI (``flmm ground``), the web page (``flmm web``),
ReasonSeg and POPE evaluation.

``from flmm.chat import GroundedChat`` (loaded on first use).
"""

__all__ = ["ChatResult", "GroundedChat", "VisualCoT"]


def __getattr__(name: str):
    if name in __all__:
        from flmm.chat import conversation

        return getattr(conversation, name)
    raise AttributeError(f"module 'flmm.chat' has no attribute {name!r}")
