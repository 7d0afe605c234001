"""The sweep plot names and rings the chosen trial: which architecture and augmentation won."""

from __future__ import annotations

import io

from PIL import Image

from organtrain.search import results

SPACE = {
    "train.learning_rate": "loguniform",
    "model.filters": "choice",
    "augment.horizontal_flip": "choice",
    "model.name": "fixed",
}


def _row(trial_id: str, value: float, lr: float, filters: str, flip: str) -> dict:
    return {
        "trial_id": trial_id,
        "best_value": value,
        "stop_reason": "completed",
        "config/train.learning_rate": lr,
        "config/model.filters": filters,  # lists are stored as JSON text
        "config/augment.horizontal_flip": flip,  # and booleans too (results._column_value)
    }


ROWS = [
    _row("a", 0.40, 1e-3, "[16, 32]", "true"),
    _row("b", 0.21, 3.1234e-3, "[32, 64, 64]", "false"),
    _row("c", float("nan"), 2e-3, "[16, 32]", "false"),  # errored: no metric
]


def test_the_chosen_trials_searched_values_are_written_out():
    searched = [k for k, kind in SPACE.items() if kind != "fixed"]
    text = results.chosen_settings(ROWS[1], searched)
    assert text == "chosen: learning_rate=0.00312, filters=[32, 64, 64], horizontal_flip=false"


def test_the_plot_renders_with_and_without_a_chosen_trial():
    for chosen in ("b", None, "not-a-trial"):
        png = results.sweep_png(
            ROWS, organ="lung", metric="val_loss", space_kinds=SPACE, chosen=chosen
        )
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG" and image.width > image.height > 100
