"""FewSound / HyperSound on Ray: data-parallel training (Ray Train) and the paper's Tables 2-6 as one grid.

train.py       run_training: the driver (workers asked for, the keyed MLflow run, the Ray Train run, resume)
worker.py      what each Ray Train worker does per epoch: train, validate, report; rank 0 logs and prints
data.py        the corpus's splits on Ray Data, each worker's crops and validation clips
grid.py        run_grid: every training of the Tables 2-6 cells (fewsound.hyper.catalogue), evaluated as it
               finishes; grid_plan.py: its settings and trainings; grid_report.py: what its parent run gets
evaluation.py  a trained model's evaluation (validation set, long audio), logged on its run
"""

from tune.hyper.train import TrainSummary, run_training

__all__ = ["TrainSummary", "run_training"]
