"""Train-free speculative decoding (`--speculate lookup|recycle`): a drafter guesses the next
tokens, the model verifies them all in one forward, and the cache drops the ones it rejects.
Greedy output is the plain decoding's; sampled output keeps its distribution.

    config.py    SpeculationParams: the GenerationConfig fields and their checks
    drafters.py  PromptLookup, TokenRecycling: one class per drafter, one small protocol
    tree.py      DraftTree: a draft with branches (node i's token and parent; depths, visibility)
    control.py   DraftControl: how much to draft next (less, or nothing for a while, when drafts miss)
    steps.py     SpeculativeSteps: one decode step — draft, verify, accept, roll back
"""

from edgetok.runtimes.speculation.config import SPECULATE_CHOICES, SpeculationParams
from edgetok.runtimes.speculation.control import DraftControl
from edgetok.runtimes.speculation.drafters import Drafter, PromptLookup, TokenRecycling
from edgetok.runtimes.speculation.steps import SpeculativeSteps
from edgetok.runtimes.speculation.tree import DraftTree

__all__ = ["SPECULATE_CHOICES", "SpeculationParams", "DraftControl", "Drafter", "PromptLookup", "TokenRecycling",
           "SpeculativeSteps", "DraftTree", "new_drafter"]


def new_drafter(params: SpeculationParams, vocab_size: int) -> Drafter:
    """The drafter `params.speculate` names (not "none")."""
    if params.speculate == "lookup":
        return PromptLookup(params.lookup_ngram_min, params.lookup_ngram_max)
    assert params.speculate == "recycle", params.speculate
    return TokenRecycling(vocab_size, params.draft_width)
