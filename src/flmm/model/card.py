"""The model card (README.md with Hugging Face metadata) of a head folder, from its config.json.

Plain string formatting; the YAML header is written by huggingface_hub's ``ModelCardData`` so
``model-index`` follows the Hub's format.
"""

from __future__ import annotations

import math

from huggingface_hub import EvalResult, ModelCardData

HEAD_LICENSE = "apache-2.0"  # flmm's licence, and so the trained head's
SAM_LICENSE = "Apache-2.0 (segment-anything, https://github.com/facebookresearch/segment-anything)"
FLMM_MODELS = "Apache-2.0 (built by flmm from its own recipe; no third-party weights)"
# the licence of the base LMMs flmm was tried with, by hub id; others: "see the model's card"
LMM_LICENSES = {
    "llava-hf/llava-1.5-7b-hf": "Llama 2 Community License (LLaVA-1.5 is fine-tuned from Vicuna / Llama 2)",
    "llava-hf/llava-1.5-13b-hf": "Llama 2 Community License (LLaVA-1.5 is fine-tuned from Vicuna / Llama 2)",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "Llama 2 Community License (Vicuna / Llama 2 base)",
    "llava-hf/llava-v1.6-mistral-7b-hf": "Apache-2.0 (Mistral-7B base)",
}
METRICS = (("giou", "gIoU"), ("ciou", "cIoU"))
STAGES = (("", "refined (SAM)"), ("coarse_", "coarse (mask head)"))

CARD = """{header}
# F-LMM grounding head for `{lmm_id}`

A trained [F-LMM](https://arxiv.org/abs/2406.05821) head: it turns the word-to-image attention of
a **frozen** large multimodal model into segmentation masks of the phrases it reads or writes
(a U-Net mask head, a text prompt projection and SAM's prompt encoder + mask decoder). The LMM
itself is not changed and not included: the folder holds only the trainable weights
(`model.safetensors`, {params} parameters) and `config.json`, which names the LMM and the SAM to
load with them.

```python
from flmm.chat.conversation import GroundedChat

# this folder, or its hub id; builds the LMM and SAM named in config.json
chat = GroundedChat.from_pretrained("path/to/this/folder")
result = chat.chat(image, "What is in the picture?")  # answer + one mask per key phrase
```

## Models it depends on

| part | model | licence |
|---|---|---|
| frozen LMM ({family}) | `{lmm_id}` | {lmm_license} |
| SAM ({sam_variant}) | `{sam_file}` | {sam_license} |
| this head | flmm {flmm_version} | Apache-2.0 |

Use of the head with an LMM is bound by that LMM's licence as well as this one.

## Training

{training}

## Evaluation

{evaluation}

## Frozen-LMM check

{frozen}

## Intended use

Research on pixel grounding of frozen multimodal models: segmenting the objects a referring
expression or an answer names, grounded conversation, and studying what the frozen LMM's attention
knows. {intended_extra}

## Out-of-scope use

Decisions about people (identification, surveillance, profiling), medical, legal or safety-critical
use, and any use on data unlike the training data without evaluating it there first. The masks
are only as good as the LMM's attention: a phrase the LMM misreads is segmented wrongly, with no
warning.

## Known limits

{limits}
"""

TRAINING = """- data: {dataset} (`{datamodule}`), {train_samples} training samples
- optimizer: AdamW, lr {lr}, betas {betas}, weight decay {weight_decay}; a linear warm-up over
  {warmup_ratio} of the steps, then cosine decay to 0
- {epochs} epochs, {steps} optimizer steps, batch size {batch_size}, precision {precision},
  seed {seed}
- weights: `{checkpoint}` of run `{run}` (the best {monitor} on the validation split)"""
SYNTHETIC = """- Trained and scored on flmm's **synthetic world** (coloured shapes on 96 x 96 images): a
  toy for checking the pipeline end to end. Its scores say nothing about natural images.
- The tiny LLaVA and tiny SAM are built by flmm for this world; they know nothing else."""
REAL = """- The masks inherit the biases of the base LMM (its pretraining data and its language) and
  of the grounding data (COCO-based RefCOCO/+/g and PNG: mostly Western, everyday scenes and
  English expressions); groups and objects rare there are segmented worse.
- One mask per phrase: several instances named by one phrase come out as one region."""


def lmm_license(lmm_id: str) -> str:
    if lmm_id.startswith("flmm:") or "tiny_llava" in lmm_id:
        return FLMM_MODELS
    known = LMM_LICENSES.get(lmm_id)
    if known:
        return known
    if lmm_id.count("/") == 1 and not lmm_id.startswith(("/", ".")):
        return f"see https://huggingface.co/{lmm_id}"
    return "see the licence of the local model it names"


def is_hub_id(lmm_id: str) -> bool:
    return lmm_id.count("/") == 1 and not lmm_id.startswith(("/", ".", "flmm:", "~"))


def _value(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}"


def score_rows(scores: dict[str, float]) -> list[str]:
    """Markdown rows ``| masks | gIoU | cIoU |`` of one split's flat scores (``giou``,
    ``coarse_giou``, ...)."""
    return [
        f"| {stage} | " + " | ".join(_value(scores.get(prefix + key)) for key, _ in METRICS) + " |"
        for prefix, stage in STAGES
    ]


def evaluation_text(config: dict) -> str:
    """The evaluation tables: the test split of training, then any ``flmm evaluate`` sets."""
    parts = []
    scores = config.get("scores") or {}
    data = (config.get("training") or {}).get("dataset", "the training data")
    if scores.get("test"):
        header = "| masks | " + " | ".join(name for _, name in METRICS) + " |\n|---|---|---|"
        rows = "\n".join(score_rows(scores["test"]))
        parts.append(f"Test split of {data}, at the end of training (x100):\n\n{header}\n{rows}")
    for key, split_scores in (scores.get("evaluation") or {}).items():
        header = "| masks | " + " | ".join(name for _, name in METRICS) + " |\n|---|---|---|"
        rows = "\n".join(score_rows(split_scores))
        parts.append(f"`flmm evaluate` on {key} (x100):\n\n{header}\n{rows}")
    return "\n\n".join(parts) or "Not evaluated yet: run `flmm evaluate checkpoint=<this folder>`."


def training_text(training: dict | None, hp: dict) -> str:
    if not training:
        return "Not recorded (the folder was saved outside a training run)."
    return TRAINING.format(**training, **hp)


def frozen_text(check: dict | None) -> str:
    if not check:
        return "Not run for this head (the `frozen_lmm_check` callback was off)."
    verdict = "**passed**: identical" if check["unchanged"] else "**FAILED**: different"
    return (
        f"{verdict} LMM weights (SHA-256 `{check['fingerprint'][:16]}...`) and greedy answers to "
        f"{check['questions']} questions on {check['images']} validation images, before and after "
        "training: the LMM stays frozen."
    )


def card_metadata(config: dict) -> ModelCardData:
    """The YAML header: licence, base model, tags, datasets and a ``model-index``."""
    lmm_id = config["lmm"]["id"]
    training = config.get("training") or {}
    dataset = training.get("dataset", "unknown")
    test = (config.get("scores") or {}).get("test") or {}
    results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Referring expression segmentation",
            dataset_type=dataset,
            dataset_name=dataset,
            dataset_split="test",
            metric_type=prefix + key,
            metric_name=f"test {name} ({stage.split()[0]})",
            metric_value=round(float(test[prefix + key]), 4),
        )
        for prefix, stage in STAGES
        for key, name in METRICS
        if prefix + key in test and not math.isnan(test[prefix + key])
    ]
    return ModelCardData(
        library_name="flmm",
        license=HEAD_LICENSE,
        base_model=lmm_id if is_hub_id(lmm_id) else None,
        tags=["flmm", "referring-segmentation", "grounding", "frozen-lmm", config["lmm"]["family"]],
        # the synthetic world is no hub dataset
        datasets=[dataset] if training and not training.get("synthetic") else None,
        model_name=f"flmm-{config['lmm']['family']}-head",
        eval_results=results or None,
    )


def render_card(config: dict) -> str:
    """The model card text of a head folder's ``config``."""
    lmm, sam, training = config["lmm"], config["sam"], config.get("training")
    synthetic = bool(training and training.get("synthetic"))
    return CARD.format(
        header=f"---\n{card_metadata(config).to_yaml()}\n---",
        lmm_id=lmm["id"],
        family=lmm["family"],
        params=f"{config['parameters']:,}",
        lmm_license=lmm_license(lmm["id"]),
        sam_variant=sam["variant"],
        sam_file=sam["file_name"],
        sam_license=FLMM_MODELS if sam["variant"] == "tiny" else SAM_LICENSE,
        flmm_version=config["flmm_version"],
        training=training_text(training, config["hyper_parameters"]),
        evaluation=evaluation_text(config),
        frozen=frozen_text((training or {}).get("frozen_lmm_check")),
        intended_extra="For this head: a worked example of the pipeline, nothing more."
        if synthetic
        else "",
        limits=SYNTHETIC if synthetic else REAL,
    )
