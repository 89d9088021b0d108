"""The library that the scripts at the top share. A run of train_cifar100.py, in the order it meets
these modules:

    stopping.py     Ctrl-C, SIGTERM, SIGHUP from the first line to the last (torch-free)
    options.py      every training option in one table: flag, type, default, its meaning to a
                    run's identity, a resume and table.py (torch-free)
    cli.py          the parsers built from that table, and the flags the other scripts share
    arguments.py    a run's arguments settled once: defaults derived, a resume's recorded values
    speed.py        how the model runs on the device: amp, layout, compile, CUDA graphs, DDP
    run_data.py     the data: --dataset, the --val split, the normalization, the loaders
      cifar.py, image_folder.py, loaders.py    the formats on disk and the batches
    recipes.py      the model built and initialised, the loss, SGD, the LR schedule, the seeds
    ema_kernels.py  EMA's Triton kernels or its PyTorch path, chosen by measurement on the GPU
    engine.py       a training step, the divergence watch, evaluation
    run_folder.py   checkpoints, metrics.csv, args.json, the lock, the TensorBoard log
      event_log.py, pictures.py, checkpoints.py

table.py and reproduce.py read finished runs through run_records.py (torch-free).
"""
