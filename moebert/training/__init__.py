"""Training, the parts train.py's loop is made of: pairs and batches (`batches`), the loss and its step (`losses`),
stored stem states (`stem_states`), the recipes (`recipes`), what the run sets up on its model (`setup`), the run's
record (`state`), the best model and experts (`selection`), its folders and saves (`workspace`) and stopping on a signal
(`preemption`). Their messages go through accelerate's logger: they run under an Accelerator."""
