"""Training objectives: how a task file becomes batches, a loss, and eval metrics.

- `base`: the `Objective` contract the loop trains through, the registry (`register_objective`,
  `objective_class`, `all_objectives`) and the helpers objectives share (loss, batching, devices);
- `seq2seq`: text-to-text fine-tuning of an encoder-decoder (`seq2seq`);
- `pretraining`: self-supervised objectives on plain text (`causal_lm`, `masked_lm`,
  `masked_lm_whole_word`, `next_sentence`, `masked_lm_nsp`, `sentence_order`, `masked_lm_sop`,
  `permutation_lm`,
  `span_corruption`, `denoising`);
- `tasks`: fine-tuning with a task head (`classification`, `token_classification`,
  `question_answering`) or through the LM head (`prompt_classification`).

Importing this package imports every module above, so every objective is registered by name.
"""

from ferry.train.objectives.base import (
    Objective,
    all_objectives,
    objective_class,
    register_objective,
)
from ferry.train.objectives.pretraining import (
    CausalLMObjective,
    DenoisingObjective,
    MaskedLMNextSentenceObjective,
    MaskedLMObjective,
    MaskedLMSentenceOrderObjective,
    NextSentenceObjective,
    PermutationLMObjective,
    SentenceOrderObjective,
    SpanCorruptionObjective,
    WholeWordMaskedLMObjective,
)
from ferry.train.objectives.seq2seq import Seq2SeqObjective
from ferry.train.objectives.tasks import (
    ClassificationObjective,
    PromptClassificationObjective,
    QuestionAnsweringObjective,
    TokenClassificationObjective,
)

__all__ = [
    "CausalLMObjective",
    "ClassificationObjective",
    "DenoisingObjective",
    "MaskedLMNextSentenceObjective",
    "MaskedLMObjective",
    "MaskedLMSentenceOrderObjective",
    "NextSentenceObjective",
    "Objective",
    "PermutationLMObjective",
    "PromptClassificationObjective",
    "QuestionAnsweringObjective",
    "SentenceOrderObjective",
    "Seq2SeqObjective",
    "SpanCorruptionObjective",
    "TokenClassificationObjective",
    "WholeWordMaskedLMObjective",
    "all_objectives",
    "objective_class",
    "register_objective",
]
