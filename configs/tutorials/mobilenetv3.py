"""A third-party MobileNetV3-Large definition, laid out as the widely used d-li14/mobilenetv3.pytorch
(features = stem + 15 inverted residual blocks, conv, avgpool, classifier Linear(960, 1280) -
Hardswish - Dropout - Linear(1280, classes)), for configs/tutorials/mobilenetv3_own_code.yaml: dtl
loads it as `mobilenetv3:mobilenetv3_large` with PYTHONPATH=configs/tutorials. Written for dtl's
tutorial; the layout (and so the key names of that project's weights) is what matters."""
import torch.nn as nn


def _make_divisible(v, divisor=8):
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class SELayer(nn.Module):
    def __init__(self, channel, reduction=4):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channel, _make_divisible(channel // reduction)), nn.ReLU(inplace=True),
                                nn.Linear(_make_divisible(channel // reduction), channel), nn.Hardsigmoid())

    def forward(self, x):
        b, c, _, _ = x.size()
        return x * self.fc(self.avg_pool(x).view(b, c)).view(b, c, 1, 1)


def conv_3x3_bn(inp, oup, stride):
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.Hardswish())


def conv_1x1_bn(inp, oup):
    return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.Hardswish())


class InvertedResidual(nn.Module):
    def __init__(self, inp, hidden_dim, oup, kernel_size, stride, use_se, use_hs):
        super().__init__()
        self.identity = stride == 1 and inp == oup
        act = nn.Hardswish() if use_hs else nn.ReLU(inplace=True)
        layers = []
        if inp != hidden_dim:
            layers += [nn.Conv2d(inp, hidden_dim, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden_dim), act]
        layers += [nn.Conv2d(hidden_dim, hidden_dim, kernel_size, stride, (kernel_size - 1) // 2, groups=hidden_dim,
                             bias=False), nn.BatchNorm2d(hidden_dim)]
        if inp == hidden_dim:
            layers += [act]
        layers += [SELayer(hidden_dim) if use_se else nn.Identity()]
        if inp != hidden_dim:
            layers += [act]
        layers += [nn.Conv2d(hidden_dim, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.identity else self.conv(x)


LARGE = [  # k, expansion, channels, SE, hard-swish, stride
    [3, 1, 16, 0, 0, 1], [3, 4, 24, 0, 0, 2], [3, 3, 24, 0, 0, 1], [5, 3, 40, 1, 0, 2], [5, 3, 40, 1, 0, 1],
    [5, 3, 40, 1, 0, 1], [3, 6, 80, 0, 1, 2], [3, 2.5, 80, 0, 1, 1], [3, 2.3, 80, 0, 1, 1], [3, 2.3, 80, 0, 1, 1],
    [3, 6, 112, 1, 1, 1], [3, 6, 112, 1, 1, 1], [5, 6, 160, 1, 1, 2], [5, 6, 160, 1, 1, 1], [5, 6, 160, 1, 1, 1]]


class MobileNetV3(nn.Module):
    def __init__(self, cfgs=LARGE, num_classes=1000, width_mult=1.0):
        super().__init__()
        input_channel = _make_divisible(16 * width_mult)
        layers = [conv_3x3_bn(3, input_channel, 2)]
        exp_size = input_channel
        for k, t, c, use_se, use_hs, s in cfgs:
            output_channel = _make_divisible(c * width_mult)
            exp_size = _make_divisible(input_channel * t)
            layers.append(InvertedResidual(input_channel, exp_size, output_channel, k, s, use_se, use_hs))
            input_channel = output_channel
        self.features = nn.Sequential(*layers)
        self.conv = conv_1x1_bn(input_channel, exp_size)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        output_channel = _make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
        self.classifier = nn.Sequential(nn.Linear(exp_size, output_channel), nn.Hardswish(), nn.Dropout(0.2),
                                        nn.Linear(output_channel, num_classes))

    def forward(self, x):
        x = self.avgpool(self.conv(self.features(x)))
        return self.classifier(x.view(x.size(0), -1))


def mobilenetv3_large(**kwargs):
    return MobileNetV3(LARGE, **kwargs)
