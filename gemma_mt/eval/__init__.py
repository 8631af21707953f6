"""Evaluation: `metrics` (corpus scores with signatures, the evaluation
loop) and `report` (an HTML page of the rows)."""
