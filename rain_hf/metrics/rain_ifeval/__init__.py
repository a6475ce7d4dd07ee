"""The `rain_ifeval` metric module; load it with `evaluate.load(rain_hf.evaluation.METRIC_PATH)`."""
