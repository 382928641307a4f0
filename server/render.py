"""Rendering requests into prompt segments: the implementation lives in :mod:`blending.render`, so that
the server and the connectors (e.g. client-side warming) share it without importing each other."""

from __future__ import annotations

from blending.render import (
    Chunk,
    Message,
    Piece,
    Renderer,
    RenderError,
    document_pieces,
    segments_from_pieces,
)

__all__ = ["Chunk", "Message", "Piece", "RenderError", "Renderer", "document_pieces", "segments_from_pieces"]
