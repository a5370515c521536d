"""Prompts for the real-model chapters: IOI prompts with token positions, and plain sentences."""

from svtools.data.ioi import (
    NAMES, OBJECTS, ORDERS, PLACES, TEMPLATES,
    IOIDataset, IOIPositions, IOIPrompt, IOITokens, UnknownWordsWarning, ioi_prompts, single_token_names,
)
from svtools.data.text import PLAIN_SENTENCES, plain_sentences

__all__ = [
    "NAMES", "OBJECTS", "ORDERS", "PLACES", "TEMPLATES",
    "IOIDataset", "IOIPositions", "IOIPrompt", "IOITokens", "UnknownWordsWarning", "ioi_prompts",
    "single_token_names",
    "PLAIN_SENTENCES", "plain_sentences",
]
