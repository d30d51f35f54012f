"""Training: the LightningModule (module.py: losses and steps), its optimiser and schedule (optim.py,
schedules.py), numerical safety (stability.py), activation offloading (offload.py), the callbacks (callbacks/)
and the run itself (pipeline.py: config -> data -> module -> Trainer -> fit -> export -> summary)."""
