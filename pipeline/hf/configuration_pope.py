"""The Hugging Face config of a pope-pretrain model (shipped by `pope export` as configuration_pope.py).

Its attributes are the fields of pipeline.config.ModelConfig, as `pope export` writes them into config.json
(`rope_scaling` a plain dict there); the model reads them by attribute. The usual Hugging Face names
(hidden_size, num_hidden_layers, ...) are aliases of the project's. Standard library and transformers only.
"""

from transformers import PretrainedConfig


class PopeConfig(PretrainedConfig):
    model_type = "pope"
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "num_hidden_layers": "n_layers",
                     "max_position_embeddings": "max_seq_len"}

    def __init__(self, tie_word_embeddings: bool = True, **kwargs) -> None:
        if not tie_word_embeddings:
            raise ValueError("a pope-pretrain model always ties its output head to the token embedding")
        super().__init__(tie_word_embeddings=True, **kwargs)
