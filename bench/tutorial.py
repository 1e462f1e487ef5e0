"""The PyTorch transfer-learning tutorial's training loop, reimplemented faithfully as a baseline.

Benchmarks time it side by side with this project's paths; nothing in ``pipeline/`` uses it.
It keeps the tutorial's habits on purpose: ``ImageFolder`` with its default loader,
``DataLoader(batch 4, shuffle, num_workers=4)``, ``model.train()`` for the whole network (so
frozen BatchNorm statistics drift), a full forward through the frozen backbone on every epoch,
``loss.item()`` and ``torch.sum(preds == labels.data)`` host syncs every batch.
"""
from __future__ import annotations

import os
import time

import torch
from torch import nn, optim
from torch.optim import lr_scheduler
from torchvision import datasets, models, transforms

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tutorial_loaders(data_dir: str, batch_size: int = 4, num_workers: int = 4):
    data_transforms = {
        "train": transforms.Compose([
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]),
        "val": transforms.Compose([
            transforms.Resize(256),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms[x])
                      for x in ["train", "val"]}
    dataloaders = {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size, shuffle=True,
                                                  num_workers=num_workers)
                   for x in ["train", "val"]}
    sizes = {x: len(image_datasets[x]) for x in ["train", "val"]}
    return dataloaders, sizes, image_datasets["train"].classes


def tutorial_model(state_dict: dict, mode: str, num_classes: int, device: torch.device):
    """The tutorial's ``model_conv`` (fixed) or ``model_ft`` (finetune), optimiser and scheduler."""
    model = models.resnet18()
    model.load_state_dict({k: v for k, v in state_dict.items() if not k.startswith("fc.")}, strict=False)
    if mode == "fixed":
        for param in model.parameters():
            param.requires_grad = False
    num_ftrs = model.fc.in_features
    model.fc = nn.Linear(num_ftrs, num_classes)
    model = model.to(device)
    params = model.fc.parameters() if mode == "fixed" else model.parameters()
    optimizer = optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    return model, optimizer, scheduler


def tutorial_train_model(model, criterion, optimizer, scheduler, dataloaders, dataset_sizes, device,
                         best_path: str, num_epochs: int = 1) -> dict:
    """The tutorial's ``train_model``.

    Returns ``epoch_seconds`` (train + val phases, the best-model save excluded, so that it
    compares with this project's per-epoch times, which exclude checkpoint saves too),
    ``save_seconds`` per epoch, and the best val accuracy.
    """
    best_acc = 0.0
    seconds, saves = [], []
    for epoch in range(num_epochs):
        since = time.perf_counter()
        saving = 0.0
        for phase in ["train", "val"]:
            if phase == "train":
                model.train()
            else:
                model.eval()
            running_loss = 0.0
            running_corrects = 0
            for inputs, labels in dataloaders[phase]:
                inputs = inputs.to(device)
                labels = labels.to(device)
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    _, preds = torch.max(outputs, 1)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                running_loss += loss.item() * inputs.size(0)
                running_corrects += torch.sum(preds == labels.data)
            if phase == "train":
                scheduler.step()
            epoch_loss = running_loss / dataset_sizes[phase]  # noqa: F841  (the tutorial prints it)
            epoch_acc = running_corrects.double() / dataset_sizes[phase]
            if phase == "val" and epoch_acc > best_acc:
                best_acc = epoch_acc
                started = time.perf_counter()
                torch.save(model.state_dict(), best_path)
                saving += time.perf_counter() - started
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - since - saving)
        saves.append(saving)
    return {"epoch_seconds": seconds, "save_seconds": saves, "best_val_acc": float(best_acc)}


def run_tutorial(data_dir: str, state_dict: dict, mode: str, epochs: int, device: torch.device,
                 workdir: str) -> dict:
    """``epochs`` epochs of the tutorial's loop (``mode`` fixed or finetune) on ``data_dir``."""
    dataloaders, sizes, classes = tutorial_loaders(data_dir)
    model, optimizer, scheduler = tutorial_model(state_dict, mode, len(classes), device)
    return tutorial_train_model(model, nn.CrossEntropyLoss(), optimizer, scheduler, dataloaders, sizes, device,
                                os.path.join(workdir, "tutorial_best.pt"), epochs)
