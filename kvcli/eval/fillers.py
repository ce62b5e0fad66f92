"""Seeded haystack text for the synthetic evaluation tasks.

Several styles, all generated here (nothing copied from a corpus), so the project may
ship them and a compression method cannot look good by learning one fixed filler:

* ``prose``  - procedurally generated paragraphs about a fictional town (weather, trade,
  rivers, local history, cooking, engineering, farming, festivals);
* ``report`` - log / inspection-report lines (times, crews, stock counts, readings);
* ``noise``  - the classic repetitive haystack ("The grass is green. ...").

Fillers never contain a number of five or more digits (needle values are 7 digits, the
variable-tracking value 5 digits) and never the needle wording ("special magic number",
"VAR").
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from ..core.errors import KvcliError

STYLES = ("prose", "report", "noise")

# ----------------------------------------------------------------------------- words
_ONSETS = (
    "b",
    "br",
    "c",
    "d",
    "dr",
    "f",
    "g",
    "gr",
    "h",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "st",
    "t",
    "th",
    "v",
    "w",
    "wh",
)
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "n", "r", "l", "m", "s", "th", "nd", "rk", "ll")
_TOWN_ENDS = ("ford", "wick", "mere", "ton", "holm", "bury", "stead", "vale", "haven", "moor")
_RIVER_ENDS = ("burn", "wash", "water", "brook", "run", "flow")


def _name(rng: random.Random, syllables: int) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)]
    return "".join(parts).capitalize()


def _place(rng: random.Random, ends: tuple[str, ...]) -> str:
    return _name(rng, rng.choice((1, 1, 2))) + rng.choice(ends)


_SMALL = (
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "twenty",
    "thirty",
    "forty",
    "several",
    "a dozen",
    "a handful of",
)
_SEASONS = ("spring", "summer", "autumn", "winter")
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)
_DIRS = ("north", "south", "east", "west", "upper", "lower", "old", "new")
_TIMES = (
    "at dawn",
    "by midday",
    "in the late afternoon",
    "after dusk",
    "before the bells",
    "early in the week",
    "on market day",
    "during the long evenings",
)

_TOPICS: dict[str, dict[str, tuple[str, ...]]] = {
    "weather": {
        "t": (
            "The {season} in {town} began with {weather} that lasted {small} days.",
            "Old farmers said the wind from the {dir} always brought {weather}.",
            "By {month} the {weather} had softened and the roads were passable again.",
            "Nobody in {town} could remember a {season} with so much {weather}.",
            "Clouds gathered over the {dir} hills {time}, heavy and slow.",
            "The rain gauge by the {building} overflowed twice that {season}.",
            "Children counted the seconds between lightning and thunder from the {building} steps.",
            "A thin frost covered the {crop} fields, and the mist did not lift until noon.",
        ),
        "weather": (
            "steady rain",
            "dry heat",
            "sudden storms",
            "thick fog",
            "hard frost",
            "gusty winds",
            "warm drizzle",
            "heavy snow",
            "clear skies",
            "sleet",
        ),
    },
    "trade": {
        "t": (
            "Merchants from {town2} brought {goods} up the {dir} road each {season}.",
            "The price of {goods} doubled after the bridge at {town2} was closed.",
            "A guild of {trade} kept its ledgers in the back room of the {building}.",
            "Traders often bartered {goods} for {goods2} rather than use coin.",
            "The {dir} market sold {goods}, {goods2} and bolts of dyed cloth.",
            "Every cart paid a small toll at the gate, counted in copper pieces.",
            "The {trade} of {town} were known for fair weights and sharp bargaining.",
            "When the caravans were late, the shelves of the {building} stood empty.",
        ),
        "goods": (
            "salt",
            "wool",
            "timber",
            "copper pots",
            "dried fish",
            "barley",
            "honey",
            "lamp oil",
            "leather",
            "river clay",
            "spices",
            "candles",
            "rope",
        ),
        "goods2": (
            "cheese",
            "iron nails",
            "linen",
            "apples",
            "tallow",
            "glassware",
            "tea",
            "firewood",
            "paper",
            "tin cups",
        ),
        "trade": (
            "weavers",
            "coopers",
            "smiths",
            "tanners",
            "potters",
            "chandlers",
            "millers",
            "masons",
            "rope makers",
        ),
    },
    "rivers": {
        "t": (
            "The {river} winds past {town} before it joins a wider stream near {town2}.",
            "In dry years the {river} shrank to a string of quiet pools.",
            "Ferrymen on the {river} charged more when the current ran fast.",
            "Willows lined the {dir} bank of the {river}, and herons fished beneath them.",
            "A stone weir slowed the {river} just above the mill race.",
            "Spring floods carried {flot} far downstream, past the last houses of {town}.",
            "Boys dared each other to swim across the {river} {time}.",
            "The water of the {river} was brown with silt after every storm.",
        ),
        "flot": ("fallen trees", "broken fences", "reeds and branches", "lost barrels", "whole hay bales"),
    },
    "history": {
        "t": (
            "{town} was founded by {small} families who settled beside the {river}.",
            "The first {building} in {town} was built of timber and later rebuilt in stone.",
            "During the {adj} years, the council of {town} met in the back of the {building}.",
            "A chronicle kept by the {trade} records a great fire in the {dir} quarter.",
            "The old charter of {town} granted the right to hold a fair each {season}.",
            "Historians still argue about why the {dir} wall was never finished.",
            "In those days the road to {town2} was little more than a muddy track.",
            "The founders' names are carved on a worn stone near the {building}.",
        ),
        "adj": ("lean", "quiet", "troubled", "prosperous", "early", "long", "uncertain"),
        "trade": ("monks", "clerks", "weavers", "bell ringers", "schoolmasters"),
    },
    "cooking": {
        "t": (
            "The classic dish of {town} is {dish}, slow cooked with {ing} and {ing2}.",
            "Cooks add {ing} only at the end, so the flavour stays bright.",
            "Bread was baked in a shared oven behind the {building} every morning.",
            "In {season} the kitchens smelled of {ing} and roasting {ing2}.",
            "A good {dish} needs patience, a heavy pot and a low fire.",
            "Grandmothers in {town} guarded their recipes for {dish} closely.",
            "Leftover {ing2} was pickled in brine and stored in the cellar.",
            "Visitors were always offered a bowl of {dish} and a cup of warm cider.",
        ),
        "dish": (
            "barley stew",
            "onion soup",
            "river trout pie",
            "spiced lentils",
            "roast turnips",
            "plum dumplings",
            "mushroom broth",
            "oat cakes",
        ),
        "ing": ("thyme", "garlic", "black pepper", "fresh dill", "sage", "mustard seed", "bay leaves", "wild fennel"),
        "ing2": ("carrots", "chestnuts", "pears", "cabbage", "leeks", "beans", "parsnips", "mutton"),
    },
    "engineering": {
        "t": (
            "The {dir} bridge rests on {small} stone piers sunk deep into the riverbed.",
            "Engineers replaced the wooden {part} of the mill with a cast iron one.",
            "A new {machine} lifted water from the {river} to the upper fields.",
            "The {part} wore out every few years and had to be shaped again by hand.",
            "Surveyors measured the slope of the canal with a long level and patience.",
            "When the {machine} failed, the whole {dir} quarter went without water.",
            "Drawings of the {machine} are kept in a chest inside the {building}.",
            "The builders used lime mortar, which hardened slowly over many seasons.",
        ),
        "part": ("axle", "gear wheel", "sluice gate", "drive shaft", "crank", "bearing", "spillway", "pulley"),
        "machine": ("water wheel", "pump house", "windmill", "bucket chain", "steam engine", "crane"),
    },
    "farming": {
        "t": (
            "Most families in {town} grew {crop} on narrow strips of land.",
            "The {crop} harvest was poor the year the {river} flooded.",
            "Sheep grazed on the {dir} commons and were brought down before winter.",
            "Farmers rotated {crop} with beans to keep the soil rich.",
            "At harvest time everyone, even the {trade}, helped bring in the {crop}.",
            "Hedges between the fields sheltered birds and small animals.",
        ),
        "trade": ("smiths", "clerks", "millers", "teachers", "innkeepers"),
    },
    "festival": {
        "t": (
            "Each {season} {town} held a festival with music, lanterns and long tables.",
            "The {trade} marched first in the parade, carrying their painted banner.",
            "Musicians from {town2} played late into the night on the {dir} square.",
            "The festival ended when the last lantern floated down the {river}.",
            "Children competed to carve the best figure from a block of soft wood.",
        ),
        "trade": ("bakers", "weavers", "boatmen", "brewers", "carpenters"),
    },
}
_COMMON = {
    "season": _SEASONS,
    "month": _MONTHS,
    "dir": _DIRS,
    "time": _TIMES,
    "small": _SMALL,
    "building": (
        "town hall",
        "granary",
        "chapel",
        "inn",
        "mill",
        "school house",
        "customs house",
        "library",
        "watch tower",
    ),
    "crop": ("barley", "rye", "oats", "flax", "turnips", "hops", "wheat"),
}
_TRANSITIONS = (
    "",
    "",
    "",
    "",
    "Later, ",
    "Even so, ",
    "In those years, ",
    "By contrast, ",
    "Some say that ",
    "As a rule, ",
    "Meanwhile, ",
)


def _fill(
    template: str, rng: random.Random, topic: dict[str, tuple[str, ...]], town: str, town2: str, river: str
) -> str:
    values: dict[str, str] = {"town": town, "town2": town2, "river": river}
    for slot in ("season", "month", "dir", "time", "small", "building", "crop"):
        values[slot] = rng.choice(_COMMON[slot])
    for slot, words in topic.items():
        if slot != "t":
            values[slot] = rng.choice(words)
    for slot in ("goods2", "ing2", "weather", "trade", "adj", "dish", "ing", "flot", "part", "machine", "goods"):
        values.setdefault(slot, "things")
    return template.format(**values)


def _prose(rng: random.Random) -> Iterator[str]:
    towns = [_place(rng, _TOWN_ENDS) for _ in range(4)]
    rivers = [_place(rng, _RIVER_ENDS) for _ in range(3)]
    names = list(_TOPICS)
    while True:
        topic = _TOPICS[rng.choice(names)]
        town, town2 = rng.sample(towns, 2)
        river = rng.choice(rivers)
        templates = topic["t"]
        for template in rng.sample(templates, rng.randint(3, min(7, len(templates)))):
            sentence = _fill(template, rng, topic, town, town2, river)
            lead = rng.choice(_TRANSITIONS)
            if lead and not sentence.startswith(("The ", "A ")):
                lead = ""
            if lead:
                sentence = lead + sentence[0].lower() + sentence[1:]
            yield sentence[0].upper() + sentence[1:]


# ---------------------------------------------------------------------------- report
_CREWS = ("north", "south", "harbour", "night", "day", "relief", "bridge", "depot")
_SITES = (
    "pump station",
    "grain store",
    "east warehouse",
    "signal box",
    "boiler room",
    "loading dock",
    "sawmill",
    "water tower",
    "quarry gate",
    "rail yard",
)
_ITEMS = (
    "crates of nails",
    "sacks of flour",
    "coils of rope",
    "drums of oil",
    "bales of wool",
    "spare valves",
    "lengths of pipe",
    "boxes of fuses",
)
_STATUS = (
    "reported no faults",
    "noted minor wear",
    "requested spare parts",
    "completed the inspection",
    "found a loose coupling",
    "cleared the blockage",
    "logged a short delay",
    "tested the alarms",
    "replaced a worn belt",
    "secured the site for the night",
)
_READINGS = ("pressure", "temperature", "water level", "wind speed", "load")
_TRENDS = ("steady", "slightly high", "slightly low", "rising slowly", "falling", "within limits", "back to normal")
_ACTIONS = (
    "Recommend a follow-up visit next week.",
    "No action needed.",
    "Supervisor informed.",
    "Parts ordered from the main depot.",
    "Area roped off until repairs are done.",
    "Entry checked and signed.",
)


def _report(rng: random.Random) -> Iterator[str]:
    entry = rng.randint(1, 400)
    while True:
        entry = entry + 1 if entry < 9999 else 1  # never five digits
        hour, minute = rng.randint(0, 23), rng.choice(range(0, 60, 5))
        site = rng.choice(_SITES)
        kind = rng.randrange(6)
        if kind == 0:
            yield (
                f"Entry {entry}, {hour:02d}:{minute:02d}: the {rng.choice(_CREWS)} crew at the {site} "
                f"{rng.choice(_STATUS)}."
            )
        elif kind == 1:
            yield (
                f"Stock check at the {site}: {rng.randint(2, 90)} {rng.choice(_ITEMS)} on hand, "
                f"{rng.randint(1, 12)} damaged."
            )
        elif kind == 2:
            yield f"Reading at {hour:02d}:{minute:02d}, {site}: {rng.choice(_READINGS)} {rng.choice(_TRENDS)}."
        elif kind == 3:
            yield rng.choice(_ACTIONS)
        elif kind == 4:
            yield (
                f"Shift handover: {rng.choice(_SMALL)} workers on duty, the {rng.choice(_CREWS)} crew relieved at "
                f"{hour:02d}:{minute:02d}."
            )
        else:
            yield (
                f"Delivery to the {site} arrived {rng.choice(('on time', 'late', 'early', 'incomplete'))}; "
                f"{rng.randint(1, 40)} {rng.choice(_ITEMS)} unloaded."
            )


# ----------------------------------------------------------------------------- noise
_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def _noise(rng: random.Random) -> Iterator[str]:
    i = rng.randrange(len(_NOISE))
    while True:
        yield _NOISE[i % len(_NOISE)]
        i += 1


_GENERATORS = {"prose": _prose, "report": _report, "noise": _noise}

#: Very short style-neutral sentences used to close the last few tokens of a context.
PADS = (
    "Yes.",
    "No.",
    "So.",
    "Then.",
    "All quiet.",
    "It was late.",
    "Time passed.",
    "Nothing more happened.",
    "The day went on as usual.",
)


def filler_sentences(style: str, rng: random.Random) -> Iterator[str]:
    """Infinite stream of filler sentences in ``style``, fully determined by ``rng``."""
    try:
        gen = _GENERATORS[style]
    except KeyError:
        raise KvcliError(f"unknown filler style {style!r} (choose from {', '.join(STYLES)})") from None
    return gen(rng)
