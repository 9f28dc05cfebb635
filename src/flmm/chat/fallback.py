"""Which words of an answer to ground when no keyword selector is loaded: a fixed word rule.

A trained keyword selector (:mod:`flmm.chat.selector`) reads the frozen LMM's states; a head
folder fresh from ``flmm train`` has none, so :meth:`GroundedChat.chat` grounds the answer's
noun phrases found by this rule instead (docs/chat.md, "Which phrases are grounded"):

1. the answer's words are those of the selector (``\\w+``, :func:`word_spans`);
2. a content word is alphabetic and not a function word (:data:`FUNCTION_WORDS`: articles,
   pronouns, prepositions, conjunctions, auxiliary verbs, words for positions and the picture);
3. a content word right after an auxiliary verb ("is sitting", "are red") is a verb or a
   predicate, not part of a noun phrase;
4. runs of consecutive content words are the phrases ("a large red circle" -> "large red circle").

The rule is deterministic and needs no model; it knows English only.
"""

from __future__ import annotations

from flmm.chat.selector import runs, word_spans


def words(text: str) -> frozenset[str]:
    """The set of the whitespace-separated words of ``text``."""
    return frozenset(text.split())


AUXILIARIES = words("is are was were am be been being has have had do does did")
FUNCTION_WORDS = AUXILIARIES | words(
    """a an the this that these those some any each every no not yes there here it its they them
    their he him his she her we us our you your i me my one ones which who whom whose what where
    when why how and or but nor so as if than then of in on at by for from with without to into
    onto over under above below behind beside between near next up down out off about around
    across along through can could will would shall should may might must also very too just
    only all both many much more most few several other another same such top bottom left right
    middle center centre corner side front back image picture photo scene"""
)


def noun_phrase_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the noun phrases of ``text`` by the rule of the module docstring."""
    spans = word_spans(text)
    words = [text[s:e].lower() for s, e in spans]
    after_auxiliary = [False, *(w in AUXILIARIES for w in words[:-1])]
    keep = [
        w.isalpha() and w not in FUNCTION_WORDS and not aux
        for w, aux in zip(words, after_auxiliary)
    ]
    return runs(keep, spans)


def noun_phrases(text: str) -> list[str]:
    """The noun phrases of ``text`` (:func:`noun_phrase_spans`), in their order there."""
    return [text[s:e] for s, e in noun_phrase_spans(text)]
