"""The PyTorch transfer-learning tutorial's training loop, reimplemented faithfully as a baseline.

Benchmarks time it side by side with this project's paths; nothing in ``pipeline/`` uses it.
It keeps the tutorial's habits on purpose: ``model.train()`` for the whole network (so frozen
BatchNorm statistics drift), a full forward through the frozen backbone on every epoch,
``loss.item()`` and ``torch.sum(preds == labels.data)`` host syncs per batch, torchvision's
``ImageFolder`` with its default loader, ``num_workers=4``.
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
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ]),
        "val": transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224),
            transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ]),
    }
    image_datasets = {x: datasets.ImageFolder(os.path.join(data_dir, x), data_transforms[x]) for x in ("train", "val")}
    return {x: torch.utils.data.DataLoader(image_datasets[x], batch_size=batch_size, shuffle=True,
                                           num_workers=num_workers) for x in ("train", "val")}


def tutorial_model(state_dict: dict, mode: str, num_classes: int = 2) -> nn.Module:
    """``mode='fixed'``: frozen backbone, new fc trained; ``'finetune'``: everything trained."""
    model = models.resnet18()
    model.load_state_dict(state_dict, strict=False)
    if mode == "fixed":
        for param in model.parameters():
            param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def tutorial_epoch(model: nn.Module, loaders, device: torch.device, mode: str, optimizer=None, scheduler=None):
    """One epoch of the tutorial's ``train_model`` (train then val phase). Returns seconds, val acc."""
    criterion = nn.CrossEntropyLoss()
    params = model.fc.parameters() if mode == "fixed" else model.parameters()
    optimizer = optimizer or optim.SGD(params, lr=0.001, momentum=0.9)
    scheduler = scheduler or lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)
    start = time.perf_counter()
    val_acc = 0.0
    for phase in ("train", "val"):
        model.train() if phase == "train" else model.eval()
        running_loss, running_corrects = 0.0, 0
        for inputs, labels in loaders[phase]:
            inputs, labels = inputs.to(device), labels.to(device)
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
        else:
            val_acc = running_corrects.double().item() / len(loaders[phase].dataset)
    return time.perf_counter() - start, val_acc
