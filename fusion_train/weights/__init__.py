"""Where a model's weights come from: `open_model` opens any source (a fusion_train model folder,
a training checkpoint of any ZeRO stage, an HF transformers export, a Meta checkpoint) for
training (`trainer.init_from`), generation and conversion alike."""
