"""Word pools, fluent filler passages and answer normalisation shared by the workload generators.

Nothing here needs a tokenizer: lengths are approximated as ``WORDS_PER_TOKEN`` words per token.
Passages top out at about 250 tokens (the sentence banks run out).
Filler sentences never state a checkable fact (no access codes, birth cities, colours or founding
years), so only the fact sentences that the generators insert can answer a question.
"""

from __future__ import annotations

import hashlib
import random
import re

WORDS_PER_TOKEN = 0.75

PLACE_ADJ = ("north", "south", "east", "west", "old", "new", "central", "upper", "lower", "river",
             "harbour", "hill", "garden", "market", "castle", "forest")
BUILDINGS = ("library", "museum", "station", "school", "hospital", "warehouse", "gallery", "theatre",
             "bakery", "hotel", "stadium", "factory", "tower", "chapel", "cinema", "pharmacy")
OBJECTS = ("door", "bench", "gate", "fence", "lamp", "bicycle", "boat", "clock", "piano", "staircase",
           "mailbox", "roof")
COLOURS = ("red", "blue", "green", "yellow", "orange", "purple", "white", "black", "pink", "brown",
           "grey")
COLOUR_ALIASES = {"grey": ("gray",)}
FIRST_NAMES = ("Maria", "James", "Anna", "David", "Sofia", "Peter", "Laura", "Thomas", "Elena", "Daniel",
               "Clara", "Victor", "Nina", "Oscar", "Julia", "Felix", "Hannah", "Samuel", "Irene", "Hugo",
               "Alice", "Martin", "Rosa", "Leon", "Emma", "Paul", "Grace", "Simon", "Lucy", "Adam")
LAST_NAMES = ("Lopez", "Becker", "Novak", "Fischer", "Moreau", "Costa", "Jensen", "Walsh", "Rossi", "Silva",
              "Keller", "Dubois", "Larsen", "Horvat", "Brennan", "Weber", "Santos", "Lindqvist", "Okafor",
              "Tanaka", "Petrov", "Meyer", "Quinn", "Varga", "Nilsen", "Hale", "Romero", "Bauer")
CITIES = ("Paris", "London", "Tokyo", "Cairo", "Madrid", "Berlin", "Rome", "Lisbon", "Dublin", "Vienna",
          "Moscow", "Sydney", "Toronto", "Chicago", "Mumbai", "Istanbul", "Athens", "Prague", "Oslo",
          "Stockholm", "Warsaw", "Seoul", "Bangkok", "Lima", "Nairobi", "Amsterdam", "Boston", "Havana")
CITY_ALIASES: dict[str, tuple[str, ...]] = {"Prague": ("Praha",), "Lisbon": ("Lisboa",),
                                            "Vienna": ("Wien",), "Rome": ("Roma",)}
COMPANY_HEADS = ("Bluefin", "Northwind", "Silverline", "Redwood", "Brightwave", "Ironbridge", "Greenfield",
                 "Stonegate", "Clearwater", "Goldcrest", "Oakridge", "Sunpeak", "Harbourlight", "Westmark",
                 "Maplestone", "Copperleaf", "Highmoor", "Starling", "Falconer", "Lakeshore", "Pinecrest",
                 "Kingsford", "Amberline", "Foxglove", "Thornbury", "Blackwell", "Ravenscroft", "Whitcombe")
COMPANY_TAILS = ("Logistics", "Foods", "Textiles", "Motors", "Software", "Pharma", "Energy", "Furniture",
                 "Shipping", "Publishing", "Robotics", "Brewing")
# Unnamed on purpose: named towns lure the small model into answering "born in <town>".
TOWNS = ("the old town", "the harbour town", "the river valley", "the hill village", "the county town",
         "the market town")
FIELDS = ("music", "chemistry", "history", "law", "painting", "engineering", "medicine", "economics")
JOBS = ("teacher", "nurse", "carpenter", "journalist", "engineer", "chef", "librarian", "pilot")
HOBBIES = ("gardening", "chess", "sailing", "baking", "photography", "cycling", "birdwatching")
PRODUCTS = ("kitchen tools", "canned soup", "wool blankets", "spare parts", "garden chairs", "office paper")
LANDMARKS = ("market square", "old bridge", "town hall", "main park", "fishing pier", "bus station")

# Filler sentences per topic kind; the first sentence of a passage always introduces the topic.
_INTRO = {
    "place": ("The {place} stands at the edge of {town}, a short walk from the {landmark}.",
              "Few buildings in {town} are as well known as the {place}."),
    "person": ("{person} grew up in a small house full of books and spent long summers by the sea.",
               "{person} is well known among friends and neighbours for a kind and generous nature."),
    "company": ("{company} started as a small workshop run by two friends.",
                "{company} is one of the best known firms in the region around {town}."),
}
_BODY = {
    "place": (
        "On weekday mornings the {place} is quiet, but by noon it fills with visitors.",
        "A small cafe next to the entrance serves tea, soup and fresh bread.",
        "The staff organise a festival every {season}, which draws people from nearby villages.",
        "Large windows let in plenty of light, and the floors are made of old oak.",
        "Many visitors say the view from the top floor of the {place} is the best in {town}.",
        "Parking is limited, so most people arrive by bus or by bicycle.",
        "The building was designed by the same architect who planned the town hall.",
        "A long renovation finished last {season} and added a lift and a new roof garden.",
        "Local children often come after school to read, draw or simply meet their friends.",
        "The opening hours change in winter, so it is wise to check before travelling.",
        "Guided tours start at the main entrance and last about an hour.",
        "A small garden behind the building is full of roses in early summer.",
        "The old clock above the entrance still rings every hour.",
        "Volunteers help the staff on busy weekends and during school holidays.",
    ),
    "person": (
        "As a young adult, {first} studied {field} and later worked as a {job}.",
        "Friends describe {first} as patient, curious and quick to laugh.",
        "{first} now lives on a quiet street near the park with two old cats.",
        "In the evenings {first} enjoys {hobby} and long walks along the river.",
        "Colleagues remember {first} as someone who always finished the work on time.",
        "Every {season}, {first} travels to the mountains to visit an old friend.",
        "{first} once said that the best ideas come during a slow breakfast.",
        "A small local newspaper wrote a friendly article about {first} last {season}.",
        "{first} speaks three languages and still takes evening classes.",
        "On weekends {first} volunteers at a shelter for stray dogs.",
        "{first} keeps a diary and writes a few lines in it every night.",
        "Neighbours often ask {first} for advice about their gardens.",
        "{first} has a younger brother who works as a sailor.",
        "Most mornings {first} drinks strong coffee and reads the newspaper.",
    ),
    "company": (
        "Today {company} employs several hundred people and sells {product} across the region.",
        "Its main office sits in a converted warehouse near the railway station of {town}.",
        "The company is known for reliable service and a friendly support team.",
        "Each {season} {company} sponsors a local football club and a summer concert.",
        "Its founders still meet the staff every month to hear their ideas.",
        "Customers often praise the simple design and the long guarantee of its {product}.",
        "In recent years the firm opened a training centre for young workers.",
        "The company board meets in {town} and publishes a short report every {season}.",
        "{company} buys most of its materials from small local suppliers.",
        "Workers at {company} can take part in a yearly sports day.",
        "The firm recently moved its warehouse to a larger site outside the city.",
        "Many of its managers started as apprentices on the factory floor.",
        "{company} answers every customer letter within two days.",
    ),
}
_GENERAL = (  # no town names: also used in person and company passages
    "On Saturday mornings the local market sells apples, cheese and honey.",
    "Tourists usually come in {season}, when the streets are full of music.",
    "The bus to the coast leaves every hour from the {landmark}.",
    "The region is known for its green hills, quiet lakes and long cycling paths.",
    "Most families in the area have lived there for several generations.",
    "A new library and a swimming pool were opened nearby a few years ago.",
)
_PLACE_GENERAL = (
    "The weather in {town} is mild for most of the year, with heavy rain in late autumn.",
    "A narrow road winds from the valley up to the old stone walls of {town}.",
)
SEASONS = ("spring", "summer", "autumn", "winter")


def words(text: str) -> int:
    """Number of whitespace-separated words."""
    return len(text.split())


def target_words(tokens: int) -> int:
    """Approximate number of words for ``tokens`` tokens."""
    return max(1, round(tokens * WORDS_PER_TOKEN))


def _slots(rng: random.Random, topic: dict[str, str]) -> dict[str, str]:
    slots = {"town": rng.choice(TOWNS), "landmark": rng.choice(LANDMARKS), "season": rng.choice(SEASONS),
             "field": rng.choice(FIELDS), "job": rng.choice(JOBS), "hobby": rng.choice(HOBBIES),
             "product": rng.choice(PRODUCTS)}
    slots.update(topic)
    return slots


def passage(rng: random.Random, kind: str, topic: dict[str, str], n_words: int,
            inserts: tuple[str, ...] = ()) -> str:
    """A fluent passage about ``topic`` of about ``n_words`` words, with the ``inserts`` sentences
    (facts) placed at random positions after the introduction."""
    slots = _slots(rng, topic)
    intro = rng.choice(_INTRO[kind]).format(**slots)
    body_pool = [s.format(**slots) for s in _BODY[kind]]
    general = [s.format(**slots) for s in _GENERAL + (_PLACE_GENERAL if kind == "place" else ())]
    rng.shuffle(body_pool)
    rng.shuffle(general)
    pool = body_pool + general
    body: list[str] = []
    budget = n_words - words(intro) - sum(words(s) for s in inserts)
    while pool and budget > 0:
        sentence = pool.pop(0)
        body.append(sentence)
        budget -= words(sentence)
    for fact in inserts:
        body.insert(rng.randint(0, len(body)), fact)
    return " ".join([intro, *body])


_NON_WORD = re.compile(r"[^0-9a-z]+")


def normalize(text: str) -> str:
    """Lower-case, strip punctuation and collapse whitespace, padded with spaces for word matching."""
    return " " + " ".join(_NON_WORD.sub(" ", text.lower()).split()) + " "


def contains_answer(text: str, answers: tuple[str, ...]) -> bool:
    """True when any of ``answers`` occurs as whole words in ``text`` after normalisation."""
    hay = normalize(text)
    return any(normalize(a) in hay for a in answers if a.strip())


def content_id(text: str) -> str:
    """Stable short id of a text (16 hex digits of its SHA-256)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]
