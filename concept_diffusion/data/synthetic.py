"""Built-in synthetic corpus with a latent world state, and its coherence checker.

Document `i` of corpus `seed` is computed from `(seed, i)` alone, so the corpus
is unlimited and randomly accessible. A document tells short facts about a few
invented people and objects: where people live (and move), their job, pet and
favourite colour, where objects are (and get moved), and how many items people
hold (and gain or lose). Later sentences refer back to that state, so a model
must track it to continue a document coherently.

One template table drives both directions: `generate_document` fills templates,
`parse_sentence` inverts them with regexes built from the same table, and
`State.apply` decides whether a parsed fact agrees with what came before.

Only numpy and the standard library are used, so data code can import it
without pulling in jax.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping

import numpy as np

# Vocabulary. Words after "a" start with a consonant so no "a/an" logic is
# needed; all are single words so regex slots are plain alternations.
NAMES = (
    "Mara", "Tovin", "Elda", "Brix", "Joss", "Nell", "Oren", "Pim", "Rhea",
    "Sol", "Tam", "Una", "Vik", "Wren", "Yara", "Zed", "Ansel", "Bo", "Cato",
    "Dov", "Edda", "Finn", "Gus", "Hale", "Ida", "Juno", "Kael", "Lio", "Mina",
    "Nico", "Odo", "Pia", "Quin", "Rolf", "Sana", "Teo", "Ulla", "Vera", "Wim",
    "Xan")
CITIES = (
    "Oslo", "Lima", "Rome", "Kyiv", "Pune", "Doha", "Baku", "Riga", "Cork",
    "Bern", "Nice", "Lyon", "Porto", "Quito", "Cairo", "Delhi", "Tunis",
    "Dakar", "Hanoi", "Seoul", "Tokyo", "Perth", "Malmo", "Turku")
JOBS = (
    "baker", "pilot", "tailor", "nurse", "farmer", "painter", "sailor",
    "miner", "potter", "dentist", "chemist", "lawyer", "teacher", "cook",
    "guard", "judge")
PETS = (
    "cat", "dog", "parrot", "rabbit", "hamster", "turtle", "goat", "lizard",
    "canary", "pony")
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "orange", "grey", "teal",
    "pink", "brown")
OBJECTS = (
    "lamp", "key", "book", "vase", "clock", "kettle", "radio", "mirror",
    "basket", "hammer", "ladder", "blanket", "violin", "drum")
ROOMS = (
    "kitchen", "attic", "garden", "cellar", "hallway", "bedroom", "study",
    "garage")
ITEMS = (
    "apples", "coins", "stamps", "shells", "pencils", "marbles", "candles",
    "tickets")
ACTS = (
    "opened a shop", "met a friend", "found a flat", "took a walk",
    "joined a choir", "bought a bike", "learned to swim", "sold a car")
NUMBERS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "ten", "eleven", "twelve")
MAX_COUNT = len(NUMBERS) - 1

# Slot name (trailing digit dropped) -> the words that may fill it.
SLOT_VOCAB: Mapping[str, tuple[str, ...]] = {
    "name": NAMES, "city": CITIES, "job": JOBS, "pet": PETS,
    "colour": COLOURS, "obj": OBJECTS, "room": ROOMS, "item": ITEMS,
    "act": ACTS, "n": NUMBERS, "k": NUMBERS,
}

# Fact kind -> paraphrase templates. Each template starts with a capital
# (fixed word, name or city) and ends with a period, so documents read as prose.
TEMPLATES: Mapping[str, tuple[str, ...]] = {
    "city": (
        "{name} lives in {city}.",
        "{name} has a home in {city}.",
        "{city} is home to {name}.",
        "{name} resides in {city}."),
    "job": (
        "{name} works as a {job}.",
        "{name} is a {job} by trade.",
        "{name} is a {job}.",
        "{name} earns a living as a {job}."),
    "pet": (
        "{name} has a pet {pet}.",
        "{name} owns a small {pet}.",
        "{name} keeps a {pet} at home.",
        "At home, {name} has a {pet}."),
    "colour": (
        "{name} likes the colour {colour}.",
        "{name} loves the colour {colour}.",
        "{name} likes {colour} best.",
        "{name} is fond of {colour}."),
    "count": (
        "{name} has {n} {item}.",
        "{name} owns {n} {item}.",
        "{name} keeps {n} {item}.",
        "{name} has a box of {n} {item}."),
    "place": (
        "The {obj} is in the {room}.",
        "The {obj} sits in the {room}.",
        "There is a {obj} in the {room}."),
    # State changes: the "from" value must match the current state.
    "move": (
        "{name} moved from {city} to {city2}.",
        "{name} left {city} for {city2}.",
        "{name} went from {city} to {city2}."),
    "obj_move": (
        "{name} moved the {obj} from the {room} to the {room2}.",
        "{name} took the {obj} from the {room} to the {room2}.",
        "The {obj} went from the {room} to the {room2}."),
    "gain": (
        "{name} got {k} more {item}.",
        "{name} found {k} more {item}.",
        "{name} bought {k} more {item}."),
    "lose": (
        "{name} lost {k} {item}.",
        "{name} gave away {k} {item}.",
        "{name} sold {k} {item}."),
    # References: restate the current state inside a new event.
    "city_ref": (
        "In {city}, {name} {act}.",
        "{name} {act} in {city}.",
        "While in {city}, {name} {act}."),
    "job_ref": (
        "As a {job}, {name} works hard.",
        "{name} went to work as a {job}.",
        "The {job} {name} started work early."),
    "pet_ref": (
        "{name} fed the {pet}.",
        "{name} walked the {pet}.",
        "{name} played with the {pet}."),
    "colour_ref": (
        "{name} wore {colour} again, as always.",
        "{name} picked {colour}, as usual.",
        "{name} chose {colour} again."),
    "count_ref": (
        "Now {name} has {n} {item}.",
        "{name} now owns {n} {item}.",
        "So {name} has {n} {item}."),
    "obj_ref": (
        "{name} found the {obj} in the {room}.",
        "In the {room}, {name} used the {obj}.",
        "{name} saw the {obj} in the {room}."),
}

# Kinds that state or restate a fixed-per-person attribute, and that attribute.
ATTR_OF_KIND = {
    "city": "city", "city_ref": "city", "job": "job", "job_ref": "job",
    "pet": "pet", "pet_ref": "pet", "colour": "colour",
    "colour_ref": "colour",
}

_SLOT_RE = re.compile(r"\{(\w+)\}")
_SPLIT_RE = re.compile(r"(?<=[.!?])(?:\s+|$)")


@dataclasses.dataclass(frozen=True)
class Fact:
  """One parsed or generated sentence: its kind, template index and slot words."""
  kind: str
  template: int
  args: tuple[tuple[str, str], ...]

  def __getitem__(self, slot: str) -> str:
    return dict(self.args)[slot]

  @classmethod
  def make(cls, kind: str, template: int, args: Mapping[str, str]) -> Fact:
    """Builds a Fact with its args in a canonical (sorted) order."""
    return cls(kind, template, tuple(sorted(args.items())))

  def render(self) -> str:
    """The sentence this fact stands for."""
    return TEMPLATES[self.kind][self.template].format(**dict(self.args))


def _slot_vocab(slot: str) -> tuple[str, ...]:
  return SLOT_VOCAB[slot.rstrip("0123456789")]


def _template_regex(template: str) -> re.Pattern[str]:
  """Inverts one template: fixed text escaped, each slot an alternation of its words."""
  parts, pos = [], 0
  for m in _SLOT_RE.finditer(template):
    parts.append(re.escape(template[pos:m.start()]))
    # Longest first so a word is never matched by a prefix of another.
    words = sorted(_slot_vocab(m.group(1)), key=len, reverse=True)
    parts.append(f"(?P<{m.group(1)}>{'|'.join(map(re.escape, words))})")
    pos = m.end()
  parts.append(re.escape(template[pos:]))
  return re.compile("".join(parts))


_PARSERS = tuple(
    (kind, i, _template_regex(t))
    for kind, ts in TEMPLATES.items() for i, t in enumerate(ts))


def parse_sentence(sentence: str) -> Fact | None:
  """The fact a sentence states if it is exactly one of the templates, else None."""
  text = " ".join(sentence.split())
  for kind, i, regex in _PARSERS:
    m = regex.fullmatch(text)
    if m:
      return Fact.make(kind, i, m.groupdict())
  return None


def split_sentences(text: str) -> list[str]:
  """Splits on '.', '!' or '?' followed by whitespace or the end; drops empties."""
  return [s.strip() for s in _SPLIT_RE.split(text) if s.strip()]


@dataclasses.dataclass
class State:
  """What the sentences so far have established about the world."""
  # (person, attribute) -> value, attribute in city | job | pet | colour.
  attrs: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)
  # (person, item) -> count; None once a change was applied to an unknown count.
  counts: dict[tuple[str, str], int | None] = dataclasses.field(
      default_factory=dict)
  # object -> room it is in.
  rooms: dict[str, str] = dataclasses.field(default_factory=dict)

  def apply(self, fact: Fact) -> bool:
    """Whether `fact` agrees with the state; if it does, the state absorbs it.

    A contradicting fact leaves the state unchanged, so one wrong sentence is
    counted once rather than poisoning every later judgement. Facts about
    entities (or attributes) not yet mentioned are new information and agree.
    """
    args = dict(fact.args)
    if fact.kind in ATTR_OF_KIND:
      attr = ATTR_OF_KIND[fact.kind]  # Also the name of the value's slot.
      return self._claim(self.attrs, (args["name"], attr), args[attr])
    if fact.kind == "move":
      return self._change(self.attrs, (args["name"], "city"), args["city"],
                          args["city2"])
    if fact.kind in ("place", "obj_ref"):
      return self._claim(self.rooms, args["obj"], args["room"])
    if fact.kind == "obj_move":
      return self._change(self.rooms, args["obj"], args["room"],
                          args["room2"])
    key = (args["name"], args["item"])
    if fact.kind in ("count", "count_ref"):
      return self._claim_count(key, NUMBERS.index(args["n"]))
    sign = 1 if fact.kind == "gain" else -1
    return self._add_count(key, sign * NUMBERS.index(args["k"]))

  @staticmethod
  def _claim(table: dict, key, value) -> bool:
    """A statement of the current value: agrees unless a different one is known."""
    if table.get(key, value) != value:
      return False
    table[key] = value
    return True

  @staticmethod
  def _change(table: dict, key, old, new) -> bool:
    """A change from `old` to `new`: `old` must be current (if known) and differ."""
    if old == new or table.get(key, old) != old:
      return False
    table[key] = new
    return True

  def _claim_count(self, key: tuple[str, str], n: int) -> bool:
    if self.counts.get(key) not in (None, n):
      return False
    self.counts[key] = n
    return True

  def _add_count(self, key: tuple[str, str], delta: int) -> bool:
    """Gain (delta > 0) or loss; losing more than is held contradicts."""
    if delta == 0:
      return False
    old = self.counts.get(key)
    if old is not None and old + delta < 0:
      return False
    self.counts[key] = None if old is None else old + delta
    return True


def track_state(text: str) -> State:
  """The state established by the parseable sentences of `text`."""
  state = State()
  for sentence in split_sentences(text):
    fact = parse_sentence(sentence)
    if fact is not None:
      state.apply(fact)
  return state


def sentence_verdicts(prompt: str, continuation: str) -> list[tuple[str | None, bool]]:
  """(fact kind, consistent) of each continuation sentence, in order; kind None if no
  template parses it. Consistency is judged against the prompt and the sentences before."""
  state = track_state(prompt)
  verdicts = []
  for sentence in split_sentences(continuation):
    fact = parse_sentence(sentence)
    verdicts.append((None, False) if fact is None else (fact.kind, state.apply(fact)))
  return verdicts


def check_continuation(prompt: str, continuation: str) -> dict:
  """Scores a continuation against the facts of its prompt.

  Returns well_formed (fraction of continuation sentences that are exactly a
  template), consistent (fraction that are well formed and agree with the
  prompt and the earlier continuation sentences) and num_sentences. An empty
  continuation has nothing coherent in it: num_sentences 0 and both rates 0.0,
  so a model cannot score well by stopping at once.
  """
  verdicts = sentence_verdicts(prompt, continuation)
  n = len(verdicts)
  return {
      "well_formed": sum(kind is not None for kind, _ in verdicts) / n if n else 0.0,
      "consistent": sum(ok for _, ok in verdicts) / n if n else 0.0,
      "num_sentences": n,
  }


# --- Generation -------------------------------------------------------------

# Sentences per document, inclusive bounds.
MIN_SENTENCES, MAX_SENTENCES = 4, 12
# Relative odds of introducing, changing and referring back, per sentence.
_CATEGORY_WEIGHTS = {"intro": 4.0, "change": 2.0, "ref": 3.0}
# Counts stated by generation stay within [MIN_HELD, MAX_COUNT] so plurals fit.
MIN_HELD = 2


@dataclasses.dataclass(frozen=True)
class _Cast:
  """Who and what one document is about."""
  people: tuple[tuple[str, str], ...]  # (name, counted item)
  objects: tuple[str, ...]


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
  return words[int(rng.integers(len(words)))]


def _pick_other(rng: np.random.Generator, words: tuple[str, ...],
                current: str) -> str:
  return _pick(rng, tuple(w for w in words if w != current))


def _make_cast(rng: np.random.Generator) -> _Cast:
  names = rng.choice(len(NAMES), size=int(rng.integers(1, 4)), replace=False)
  people = tuple((NAMES[i], _pick(rng, ITEMS)) for i in names)
  objects = rng.choice(len(OBJECTS), size=int(rng.integers(0, 3)),
                       replace=False)
  return _Cast(people, tuple(OBJECTS[i] for i in objects))


def _intro_options(state: State, cast: _Cast,
                   rng: np.random.Generator) -> list[tuple[str, dict]]:
  """Facts not stated yet, with freshly drawn values."""
  out = []
  for name, item in cast.people:
    for attr in ("city", "job", "pet", "colour"):
      if (name, attr) not in state.attrs:
        out.append((attr, {"name": name, attr: _pick(rng, SLOT_VOCAB[attr])}))
    if (name, item) not in state.counts:
      n = NUMBERS[int(rng.integers(4, 9))]
      out.append(("count", {"name": name, "item": item, "n": n}))
  for obj in cast.objects:
    if obj not in state.rooms:
      out.append(("place", {"obj": obj, "room": _pick(rng, ROOMS)}))
  return out


def _change_options(state: State, cast: _Cast,
                    rng: np.random.Generator) -> list[tuple[str, dict]]:
  """Valid state changes: moves, object moves, gains and losses."""
  out = []
  for (name, attr), city in state.attrs.items():
    if attr == "city":
      out.append(("move", {"name": name, "city": city,
                           "city2": _pick_other(rng, CITIES, city)}))
  for (name, item), n in state.counts.items():
    k = int(rng.integers(2, 5))
    args = {"name": name, "item": item, "k": NUMBERS[k]}
    if n + k <= MAX_COUNT:
      out.append(("gain", args))
    if n - k >= MIN_HELD:
      out.append(("lose", args))
  for obj, room in state.rooms.items():
    out.append(("obj_move", {"name": _pick(rng, _names(cast)), "obj": obj,
                             "room": room,
                             "room2": _pick_other(rng, ROOMS, room)}))
  return out


def _ref_options(state: State, cast: _Cast,
                 rng: np.random.Generator) -> list[tuple[str, dict]]:
  """Sentences that restate the current state inside a new event."""
  out = []
  for (name, attr), value in state.attrs.items():
    args = {"name": name, attr: value}
    if attr == "city":
      args["act"] = _pick(rng, ACTS)
    out.append((f"{attr}_ref", args))
  for (name, item), n in state.counts.items():
    out.append(("count_ref", {"name": name, "item": item, "n": NUMBERS[n]}))
  for obj, room in state.rooms.items():
    out.append(("obj_ref", {"name": _pick(rng, _names(cast)), "obj": obj,
                            "room": room}))
  return out


def _names(cast: _Cast) -> tuple[str, ...]:
  return tuple(name for name, _ in cast.people)


def _next_fact(state: State, cast: _Cast, rng: np.random.Generator) -> Fact:
  """Draws a category, then an option in it, then a paraphrase template."""
  options = {
      "intro": _intro_options(state, cast, rng),
      "change": _change_options(state, cast, rng),
      "ref": _ref_options(state, cast, rng),
  }
  live = [c for c in options if options[c]]
  weights = np.array([_CATEGORY_WEIGHTS[c] for c in live])
  category = live[int(rng.choice(len(live), p=weights / weights.sum()))]
  kind, args = options[category][int(rng.integers(len(options[category])))]
  template = int(rng.integers(len(TEMPLATES[kind])))
  # Some paraphrases leave a slot out (the mover of an object); drop it so the
  # fact equals what parsing its sentence gives back.
  used = set(_SLOT_RE.findall(TEMPLATES[kind][template]))
  return Fact.make(kind, template, {k: v for k, v in args.items() if k in used})


def generate_facts(seed: int, index: int) -> list[Fact]:
  """The facts of document `index` of corpus `seed`, in order."""
  if seed < 0 or index < 0:
    raise ValueError(
        f"synthetic corpus needs seed >= 0 and index >= 0, got seed={seed}, "
        f"index={index}")
  rng = np.random.default_rng([seed, index])
  cast = _make_cast(rng)
  state, facts = State(), []
  for _ in range(int(rng.integers(MIN_SENTENCES, MAX_SENTENCES + 1))):
    fact = _next_fact(state, cast, rng)
    # Generation only proposes valid facts; a failure here is a bug.
    assert state.apply(fact), fact
    facts.append(fact)
  return facts


def generate_document(seed: int, index: int) -> str:
  """Document `index` of synthetic corpus `seed`: a function of (seed, index) alone."""
  return " ".join(f.render() for f in generate_facts(seed, index))


def generate_documents(seed: int, start: int, count: int) -> list[str]:
  """Documents start .. start + count - 1 of corpus `seed`."""
  return [generate_document(seed, i) for i in range(start, start + count)]
