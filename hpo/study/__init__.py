"""Many trials: the loop and its objective, storages, devices and workers, distributed launch, outputs, progress."""
