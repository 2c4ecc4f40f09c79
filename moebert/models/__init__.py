"""Making and publishing models: the one builder (`builder`: upcycle a BERT or load a MoE-BERT), the one model card
(`card`) and the one saver (`saving`) of trained and composed models, composition from published experts
(`composition`) and background Hub uploads (`hub`)."""
