"""rain_ifeval: IFEval instruction following of reasoning-model generations, scored on the answer part only.

An ``evaluate`` metric module. Load it offline from its folder:

    import evaluate
    from rain_hf.evaluation import METRIC_PATH

    metric = evaluate.load(METRIC_PATH)
    metric.compute(
        predictions=["<think>Lowercase, no commas.</think>hello world"],
        prompts=["Say hello in lowercase letters without commas."],
        instruction_id_list=[["change_case:english_lowercase", "punctuation:no_comma"]],
        kwargs=[[{}, {}]],
    )
"""

import json
from collections.abc import Mapping

import datasets
import evaluate

from rain_hf.evaluation import (
    instruction_following,
    split_generation,
    warn_if_no_think_tags,
    warn_if_opened_by_prompt,
)

_DESCRIPTION = """
IFEval instruction-following accuracy of generations from reasoning models. Each prediction is split into its
<think> ... </think> block and its answer (rain_hf.evaluation.split_generation); only the answer is checked, with
lm-eval's IFEval checkers (lm_eval.tasks.ifeval.instructions_registry). Returns strict and loose accuracy at prompt
level (all instructions of a prompt followed) and instruction level (fraction of instructions followed), and the
think-format rate of the predictions. Needs `pip install "rain_hf[eval]"`; the nltk data is built locally, never
downloaded.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): generated completions (prompt excluded, think tags kept, end-of-turn and padding
        tokens cut off: a trailing <|im_end|> is part of the answer the checkers read, and fails json_format or
        end_checker; rain_hf.evaluation.generate cuts them). Decode with skip_special_tokens=False: where the think
        tags are special tokens, True drops them (warned when no prediction holds a tag). The answer is scored as
        lm-eval scores the text after the think-close tag: leading whitespace removed, trailing kept.
    prompts (list of str): the prompts (given to checkers whose arguments take a prompt;
        combination:repeat_prompt reads its own prompt_to_repeat kwarg).
    instruction_id_list (list of list of str): IFEval instruction ids per prediction.
    kwargs (list of list of dict, JSON object str or None): one kwargs dict per instruction id, as in the IFEval
        data set (keys with None values, empty or whitespace-only strings are dropped); a row may also be one JSON
        list string or a numpy array, as CSV, parquet or pandas give IFEval's column. Pass it to `compute` (it is
        not an Arrow feature, so it does not go through `add_batch`). It may be left out only when no instruction takes arguments: a missing
        argument (a word limit, a keyword …) is an error, not a random draw as in lm-eval.
    think_open (str): think-open tag, default "<think>".
    think_close (str): think-close tag, default "</think>".
    prompt_ends_with_open (bool): the chat template already put think_open at the end of the prompt.
    split_thinking (bool): split off the thinking before checking (default True); False checks the whole text.
Returns:
    prompt_strict, instruction_strict, prompt_loose, instruction_loose (float): IFEval accuracies.
    think_format_rate (float): fraction of predictions with exactly one think block, then a non-empty answer.
Examples:
    >>> import evaluate
    >>> from rain_hf.evaluation import METRIC_PATH
    >>> metric = evaluate.load(METRIC_PATH)
    >>> metric.compute(predictions=["<think>ok</think>hello world"], prompts=["Answer in lowercase."],
    ...                instruction_id_list=[["change_case:english_lowercase"]], kwargs=[[{}]])["prompt_strict"]
    1.0
"""

_CITATION = """
@inproceedings{zhou2023ifeval,
  title={Instruction-Following Evaluation for Large Language Models},
  author={Zhou, Jeffrey and Lu, Tianjian and Mishra, Swaroop and Brahma, Siddhartha and Basu, Sujoy and Luan, Yi and
          Zhou, Denny and Hou, Le},
  journal={arXiv preprint arXiv:2311.07911},
  year={2023}
}
@inproceedings{huang2026rainmerging,
  title={RAIN-Merging: A Gradient-Free Method to Enhance Instruction Following in Large Reasoning Models with
         Preserved Thinking Format},
  author={Huang and others},
  booktitle={ICLR},
  year={2026}
}
"""


_ROW_SHAPE = ("each row of kwargs is a list with one dict (or JSON object string, or None) per instruction id of "
              "its prediction")


def _as_row(row, index):
    """One prediction's kwargs list; a whole row given as one JSON list string (as CSV and parquet exports of
    IFEval store it) is read as that list."""
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as err:
            raise ValueError(f"kwargs[{index}] is a string that is not a JSON list ({err}): "
                             f"{_ROW_SHAPE}.") from None
    # a list, a tuple, or a numpy array (IFEval read with pandas, or a datasets column in numpy format)
    if row is None or isinstance(row, Mapping) or not hasattr(row, "__len__") or not hasattr(row, "__iter__"):
        raise ValueError(f"kwargs[{index}] is a {type(row).__name__}: {_ROW_SHAPE}.")
    return list(row)


def _as_kwargs(item, row, column):
    """One instruction's kwargs: a dict, a JSON object string, or None."""
    if item is None:
        return {}
    if isinstance(item, str):
        try:
            item = json.loads(item) if item.strip() else {}
        except json.JSONDecodeError as err:
            raise ValueError(f"kwargs[{row}][{column}] is not valid JSON ({err}): {item!r}") from None
    if item is None:  # the JSON string "null": the same as None
        return {}
    if not isinstance(item, Mapping):
        raise ValueError(f"kwargs[{row}][{column}] is a {type(item).__name__} ({item!r}): {_ROW_SHAPE}.")
    return dict(item)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RainIfeval(evaluate.Metric):
    """IFEval scores of the answer part of reasoning-model generations."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "prompts": datasets.Value("string"),
                    "instruction_id_list": datasets.Sequence(datasets.Value("string")),
                }
            ),
            reference_urls=["https://arxiv.org/abs/2311.07911", "https://arxiv.org/abs/2602.22538"],
        )

    def _compute(
        self,
        predictions,
        prompts,
        instruction_id_list,
        kwargs=None,
        think_open="<think>",
        think_close="</think>",
        prompt_ends_with_open=False,
        split_thinking=True,
    ):
        if kwargs is None:
            kwargs = [[{} for _ in ids] for ids in instruction_id_list]
        if len(kwargs) != len(predictions):
            raise ValueError(f"{len(predictions)} predictions but {len(kwargs)} kwargs lists")
        kwargs = [[_as_kwargs(item, i, j) for j, item in enumerate(_as_row(row, i))]
                  for i, row in enumerate(kwargs)]
        warn_if_opened_by_prompt(predictions, think_open, think_close, prompt_ends_with_open)
        if split_thinking:
            warn_if_no_think_tags(predictions, think_open, think_close)
        splits = [split_generation(p, think_open, think_close, prompt_ends_with_open) for p in predictions]
        answers = [s.answer for s in splits] if split_thinking else list(predictions)
        scores = instruction_following(answers, prompts, instruction_id_list, kwargs)
        keys = ("prompt_strict", "instruction_strict", "prompt_loose", "instruction_loose")
        result = {k: scores[k] for k in keys}
        result["think_format_rate"] = sum(s.format_ok for s in splits) / len(splits)
        return result
