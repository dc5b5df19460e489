"""The expression grammar of the synthetic scenes: candidate expressions, no-target phrases, and a parser."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from rsam.data.synthetic.scene import (CATEGORIES, COLOURS, DIRECTIONS, ORDINALS, POS_MARGIN, REGIONS, RELATIONS,
                                       SIZE_RATIO, SceneObject)

def _cell(value: float) -> Optional[int]:
    """Third of [0,1] that ``value`` is in, or None when it is within POS_MARGIN of a boundary."""
    for b in (1 / 3, 2 / 3):
        if abs(value - b) < POS_MARGIN:
            return None
    return int(value >= 1 / 3) + int(value >= 2 / 3)


def _coord(o: SceneObject, direction: str) -> float:
    """Sort key for 'from the <direction>' (smaller = closer to that side)."""
    return {"left": o.cx, "right": -o.cx, "top": o.cy, "bottom": -o.cy}[direction]


def _relation_value(o: SceneObject, landmark: SceneObject, relation: str) -> float:
    """Signed distance (fraction of the side) by which ``o`` satisfies ``relation`` to ``landmark``."""
    return {
        "left of": landmark.cx - o.cx,
        "right of": o.cx - landmark.cx,
        "above": landmark.cy - o.cy,
        "below": o.cy - landmark.cy,
    }[relation]


def _heads(t: int, objs: Sequence[SceneObject]) -> List[Tuple[str, str, List[int]]]:
    """(kind, noun phrase, indices it matches) for the target's two noun phrases."""
    o = objs[t]
    same_cat = [i for i, p in enumerate(objs) if p.category == o.category]
    same_cc = [i for i in same_cat if objs[i].colour == o.colour]
    return [("category", o.category, same_cat), ("colour", f"{o.colour} {o.category}", same_cc)]


def _landmark_phrase(i: int, objs: Sequence[SceneObject]) -> Optional[str]:
    for _, phrase, matches in _heads(i, objs):
        if matches == [i]:
            return phrase
    return None


def candidate_expressions(t: int, objs: Sequence[SceneObject]) -> Dict[str, List[str]]:
    """Every template expression that singles out object ``t`` (with margins), grouped by kind."""
    out: Dict[str, List[str]] = {}

    def add(kind: str, text: str) -> None:
        out.setdefault(kind, []).append(text)

    for kind, head, cands in _heads(t, objs):
        others = [i for i in cands if i != t]
        if not others:
            add(kind, f"the {head}")
        # absolute region
        cells = {i: (_cell(objs[i].cy), _cell(objs[i].cx)) for i in cands}
        if all(None not in c for c in cells.values()) and all(cells[i] != cells[t] for i in others):
            add("region", f"the {head} {REGIONS[cells[t]]}")
        if others:
            # superlative
            area_t, areas = objs[t].area, [objs[i].area for i in others]
            if area_t >= SIZE_RATIO * max(areas):
                add("superlative", f"the largest {head}")
            if area_t * SIZE_RATIO <= min(areas):
                add("superlative", f"the smallest {head}")
            # ordinal
            for direction in DIRECTIONS:
                order = sorted(cands, key=lambda i: _coord(objs[i], direction))
                keys = [_coord(objs[i], direction) for i in order]
                if min(b - a for a, b in zip(keys, keys[1:])) < 2 * POS_MARGIN:
                    continue
                rank = order.index(t)
                if rank < len(ORDINALS):
                    add("ordinal", f"the {ORDINALS[rank]} {head} from the {direction}")
        # relation to a landmark of another category that has its own unique phrase
        for li, landmark in enumerate(objs):
            if landmark.category == objs[t].category:
                continue
            lphrase = _landmark_phrase(li, objs)
            if lphrase is None:
                continue
            for rel in RELATIONS:
                if _relation_value(objs[t], landmark, rel) >= POS_MARGIN and all(
                    _relation_value(objs[i], landmark, rel) <= -POS_MARGIN for i in others
                ):
                    add("relation", f"the {head} {rel} the {lphrase}")
    return out


def negative_candidates(objs: Sequence[SceneObject]) -> List[Tuple[str, str]]:
    """(description, category) of objects absent from the scene: absent category or colour/category pair."""
    cats = {o.category for o in objs}
    pairs = {(o.colour, o.category) for o in objs}
    out = [(f"the {c}", c) for c in CATEGORIES if c not in cats]
    out += [(f"the {col} {c}", c) for c in CATEGORIES for col in COLOURS if (col, c) not in pairs]
    return out


def _alternation(words) -> str:
    """Regex alternation, longest first (so "at the top left" wins over "at the top")."""
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_NP = rf"(?:(?P<{{p}}col>{_alternation(COLOURS)}) )?(?P<{{p}}cat>{_alternation(CATEGORIES)})"
_GRAMMAR = re.compile(
    rf"^the (?:(?P<sup>largest|smallest) |(?P<ord>{_alternation(ORDINALS)}) )?"
    + _NP.format(p="")
    + rf"(?: from the (?P<dir>{_alternation(DIRECTIONS)}))?"
    + rf"(?: (?P<region>{_alternation(REGIONS.values())}))?"
    + rf"(?: (?P<rel>{_alternation(RELATIONS)}) the "
    + _NP.format(p="l")
    + r")?$"
)


def resolve(description: str, objs: Sequence[SceneObject]) -> List[int]:
    """Objects an expression of this module's grammar refers to, evaluated without margins.

    Independent of how :func:`candidate_expressions` built the text, so the two can check each other.
    """
    m = _GRAMMAR.match(description)
    if m is None:
        raise ValueError(f"not an expression of the synthetic grammar: {description!r}")
    g = m.groupdict()

    def match_np(col: Optional[str], cat: str) -> List[int]:
        return [i for i, o in enumerate(objs) if o.category == cat and (col is None or o.colour == col)]

    cands = match_np(g["col"], g["cat"])
    if g["region"]:
        (cell,) = [k for k, v in REGIONS.items() if v == g["region"]]
        cands = [i for i in cands if (min(int(objs[i].cy * 3), 2), min(int(objs[i].cx * 3), 2)) == cell]
    if g["rel"]:
        landmarks = match_np(g["lcol"], g["lcat"])
        if len(landmarks) != 1:
            return []
        cands = [i for i in cands if _relation_value(objs[i], objs[landmarks[0]], g["rel"]) > 0]
    if g["sup"] and cands:
        key = (lambda i: -objs[i].area) if g["sup"] == "largest" else (lambda i: objs[i].area)
        cands = sorted(cands, key=key)[:1]
    if g["ord"]:
        rank = ORDINALS.index(g["ord"])
        order = sorted(cands, key=lambda i: _coord(objs[i], g["dir"]))
        cands = order[rank : rank + 1]
    return cands


def negative_category(description: str) -> str:
    """Category named by a description of this grammar (for the ``name`` field of no-target records)."""
    m = _GRAMMAR.match(description)
    if m is None:
        raise ValueError(f"not an expression of the synthetic grammar: {description!r}")
    return m.group("cat")
