"""``synthetic.caption``'s ``cue_share``: the fraction of captions that name cues, with the default giving the
captions the shipped weights were pretrained on."""

from __future__ import annotations

import numpy as np
import pytest

from mpafer.data.synthetic import caption, image_rng, render_face_with_cues

CUE_WORDS = ("eyebrows", "brows", "eyes", "mouth", "lips", "lip ", "jaw", "nose", "teeth")


def _captions(cue_share: float | None, n: int = 600) -> list[str]:
    out = []
    for i in range(n):
        rng = image_rng(3, "val", "surprise", i)
        _, cues = render_face_with_cues("surprise", rng, 32, domain="target")
        kwargs = {} if cue_share is None else {"cue_share": cue_share}
        out.append(caption("surprise", cues, rng, **kwargs))
    return out


def test_default_share_is_the_pretrained_one() -> None:
    assert _captions(None, 200) == _captions(0.7, 200)


@pytest.mark.parametrize("share", [0.0, 0.2, 0.7, 1.0])
def test_share_of_captions_naming_cues(share: float) -> None:
    texts = _captions(share)
    named = np.mean([any(w in t.lower() for w in CUE_WORDS) for t in texts])
    # surprise always has visible cues; an expression-only caption names none of these words
    assert abs(named - share) < 0.07, (share, named)
