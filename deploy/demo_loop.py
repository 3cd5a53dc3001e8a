"""Helpers of ``deploy/demo.sh`` for the live loop: follow one household through a regeneration.

``pick DATA STORE SKIP [any]``
    A household whose profile the worker regenerated from live purchases (``ts`` at or after the
    end of the validation split, where the worker's seed ends) and which buys again in the test
    split after its first ``SKIP`` events, after that profile's time, so the fusion stage will
    apply it. Only households that had a profile before the live stream (built ahead, so the
    fusion stage had it from the start: a regeneration), unless ``any`` is given: then those
    first, else one profiled live for the first time. Prints its id (nothing if none yet).
``show URL DATA STORE USER OUT [before]``
    The served answer for ``USER`` (saved as JSON to ``OUT``), the profile the fusion stage used
    for it and its top items. The profile is the newest one written strictly before the served
    event; with ``before`` only among those from before the live stream (the first live
    profiles arrive after the first purchases streamed in, seconds each, so an embedding served
    then was fused with a profile built ahead or none).
``compare BEFORE AFTER``
    The facet weights of two saved answers side by side, with the change.
``live DATA STORE``
    How many profiles in ``STORE`` were written from live purchases.
"""

from __future__ import annotations

import json
import sys
import urllib.request

from profiles.store import ProfileStore
from streaming.dataset import Dataset


def _live_profiles(data: Dataset, store: ProfileStore) -> list:
    return store.written_since(float(data.meta["split"]["val_end"]))


def pick(data_dir: str, store_path: str, skip: int, first_profiles: bool = False) -> str:
    """The household to follow, or ``""`` (``first_profiles``: may be a first profile)."""
    data = Dataset.load(data_dir)
    later = data.split("test").slice(skip).select(["user_id", "ts"]).to_pandas()
    newest = later.groupby("user_id")["ts"].max()
    profiles = _live_profiles(data, ProfileStore(store_path))
    store, start = ProfileStore(store_path), float(data.meta["split"]["val_end"])
    due = [p for p in profiles if newest.get(p.user_id, float("-inf")) > p.ts]
    ahead = {p.user_id for p in due if store.latest_before(p.user_id, start) is not None}
    due.sort(key=lambda p: p.user_id not in ahead)  # stable: regenerations first, in order
    if not first_profiles:
        due = [p for p in due if p.user_id in ahead]
    return due[0].user_id if due else ""


def _fmt_weights(weights: dict | None) -> str:
    if not weights:
        return "none"
    return ", ".join(f"{k} {v:.3f}" for k, v in weights.items())


def show(url: str, data_dir: str, store_path: str, user: str, out: str,
         mode: str = "after") -> None:
    """Print (and save) what ``/recommend`` serves for ``user`` and the profile behind it."""
    with urllib.request.urlopen(f"{url}/recommend?user={user}&k=5", timeout=10) as response:
        answer = json.load(response)
    with open(out, "w") as file:
        json.dump(answer, file)
    cut = float(answer["ts"])
    if mode == "before":
        cut = min(cut, float(Dataset.load(data_dir).meta["split"]["val_end"]))
    profile = ProfileStore(store_path).latest_before(user, cut)
    print(f"    served: embedding version {answer['version']} (event count), "
          f"last event ts={answer['ts']:.0f}")
    if profile is None:
        print("    profile used by fusion: none yet (the learned no-profile facets)")
    else:
        print(f"    profile used by fusion: v{profile.version} written from events up to "
              f"ts={profile.ts:.0f} ({'fallback' if profile.facets.fallback else 'LLM'})")
        for line in profile.facets.render().splitlines():
            print(f"      {line}")
    print(f"    facet weights: {_fmt_weights(answer['facet_weights'])}")
    for item in answer["items"]:
        print(f"    {item['score']:7.3f}  {item['title']}  ({item['brand']})")


def compare(before_path: str, after_path: str) -> None:
    """Print the facet weights of two saved answers and their change."""
    with open(before_path) as b, open(after_path) as a:
        before, after = json.load(b)["facet_weights"] or {}, json.load(a)["facet_weights"] or {}
    print(f"    {'facet':22s} {'before':>7s} {'after':>7s} {'change':>8s}")
    for name in after:
        old, new = before.get(name, float("nan")), after[name]
        print(f"    {name:22s} {old:7.3f} {new:7.3f} {new - old:+8.4f}")


def live(data_dir: str, store_path: str) -> None:
    """Print how many stored profiles were written from live purchases."""
    profiles = _live_profiles(Dataset.load(data_dir), ProfileStore(store_path))
    print(len(profiles))


def main(argv: list[str]) -> int:
    """Dispatch ``pick``, ``show``, ``compare`` or ``live`` (see the module docstring)."""
    verb, args = argv[0], argv[1:]
    if verb == "pick":
        print(pick(args[0], args[1], int(args[2]), args[3:] == ["any"]))
    elif verb == "show":
        show(*args)
    elif verb == "compare":
        compare(*args)
    elif verb == "live":
        live(*args)
    else:
        raise SystemExit(f"unknown verb {verb!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
