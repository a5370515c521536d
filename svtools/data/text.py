"""A small set of plain English sentences of our own, for non-task text.

Used where a chapter needs ordinary text that is not an IOI prompt (e.g. to contrast a head's
decomposition on task and non-task inputs). The sentences are 8 to 25 words long, name no people
and were written for this book.
"""

from __future__ import annotations

import random
from typing import Optional

from svtools._checks import SVToolsError, as_int

__all__ = ["PLAIN_SENTENCES", "plain_sentences"]

PLAIN_SENTENCES: tuple[str, ...] = (
    "The train to the coast was late again this morning, so most of the passengers stood on the platform.",
    "Fresh bread tastes best when it has cooled for a few minutes after leaving the oven.",
    "The river rose quickly after three days of heavy rain in the hills.",
    "Our neighbours planted a row of apple trees along the fence last spring.",
    "A good map shows not only the roads but also the hills, rivers and small paths between them.",
    "The museum will close early on Sunday because the staff are moving several large paintings.",
    "Most birds in the city start singing well before the sun comes up.",
    "He forgot his umbrella at the office and walked home through the storm.",
    "The old bridge was repaired with stone taken from the same quarry as the original.",
    "Children in the village learn to swim in the lake during the short summer.",
    "The recipe calls for two cups of flour, a spoon of sugar and a pinch of salt.",
    "She kept a small notebook in her coat pocket to write down ideas on the bus.",
    "Heavy snow closed the mountain pass for most of the winter.",
    "The library has a quiet room upstairs where students can read without being disturbed.",
    "Every autumn the leaves on the hill turn red and gold within a couple of weeks.",
    "The engineer checked each cable twice before switching the power back on.",
    "A cup of tea and a slice of cake made the long afternoon pass more quickly.",
    "The committee met on Tuesday to discuss the budget for next year.",
    "Tourists often miss the small harbour because it lies behind the main road.",
    "The printer in the hallway has been broken for over a week.",
    "Light travels much faster than sound, which is why we see lightning before we hear thunder.",
    "They painted the kitchen a pale shade of green to make it feel larger.",
    "The farmer moved the sheep to the higher field before the storm arrived.",
    "Our team finished the project two days early and spent the extra time testing it.",
    "The clock in the town square has shown the wrong time for years.",
    "A strong wind blew the fishing boats back into the harbour before noon.",
    "The shop on the corner sells newspapers, sweets and batteries until late at night.",
    "Water boils at a lower temperature high in the mountains because the air pressure is lower.",
    "The students gathered in the hall to hear the results of the election.",
    "He repaired the bicycle with a borrowed wrench and a new chain.",
    "The path through the forest is muddy in spring but pleasant in late summer.",
    "The orchestra rehearsed the final movement three times before the concert.",
    "Most of the houses on this street were built more than a hundred years ago.",
    "The doctor advised him to rest for a week and drink plenty of water.",
    "A thin layer of ice covered the pond on the coldest morning of the year.",
    "The new software update fixed several bugs but made the program slower to start.",
    "Our flight was delayed by fog, so we had breakfast at the airport.",
    "The gardener cut back the roses and spread fresh soil around the roots.",
    "Cats usually sleep for most of the day and become more active at dusk.",
    "The report explains how the city plans to reduce traffic in the centre.",
    "She practised the piano every evening until the difficult passage felt easy.",
    "The lighthouse has guided ships past the rocks for more than two centuries.",
    "After the meeting, everyone agreed that the plan needed more detail.",
    "The bakery on the high street opens at six and is usually sold out by ten.",
    "Strong coffee and an early start helped the crew finish the roof before dark.",
    "The kitten chased a ball of string across the kitchen floor.",
    "Volunteers cleaned the beach and collected several bags of plastic waste.",
    "The price of vegetables usually falls in late summer when the harvest comes in.",
    "The teacher wrote the main points on the board and asked the class to copy them.",
    "Thick clouds hid the mountain, but the valley below was warm and bright.",
    "The hotel offers a simple breakfast of bread, cheese, fruit and coffee.",
    "Somebody left the gate open, and the dog ran off into the field.",
)


def plain_sentences(n: Optional[int] = None, *, seed: int = 0) -> list[str]:
    """``n`` distinct sentences from :data:`PLAIN_SENTENCES` in a seeded order (all if ``None``).

    Deterministic: :class:`random.Random(seed)` shuffles the list, the first ``n`` are returned.
    """
    total = len(PLAIN_SENTENCES)
    if n is None:
        n = total
    try:
        n = as_int(n, "n", min_value=1, max_value=total)
    except SVToolsError as exc:
        raise SVToolsError(f"n must be an int in [1, {total}] (there are {total} plain sentences): {exc}") from None
    seed = as_int(seed, "seed")
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return [PLAIN_SENTENCES[i] for i in order[:n]]
