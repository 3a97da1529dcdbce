"""Guidance (Ho & Salimans 2022; Karras et al. 2024): the guided output of a network and its
guide, and the network as the samplers call it, guided."""
import torch


class Guided(torch.nn.Module):
    """Guidance around a network, as the plain model(x_t, t) every sampler calls: with weight w,
        output = guide's output + w (network's output - guide's output)      (guided_output),
    where the guide is either
    - the network itself without the labels (classifier-free guidance, Ho & Salimans 2022 eq. 6):
      output(x_t, t, null) + w (output(x_t, t, y) - output(x_t, t, null)) towards the labels y (B,),
      so w = 0 is unconditional, w = 1 conditional, w > 1 guided; both passes are one call of 2B;
    - or `guide`, a weaker network (autoguidance, Karras et al. 2024 §4: a less-trained snapshot of
      the same run) conditioned like the network, on y or, for unconditional models, on nothing:
      output(x_t, t, y) + w (output(x_t, t, y) - guide(x_t, t, y)), two calls of B.
    Every parameterisation is affine in the output at fixed x_t, so this combines the implied eps and
    x_0 alike. guided_at (T,) bool limits guidance to the marked timesteps (Kynkäänniemi et al. 2024;
    w = 1 elsewhere). A guidance-distilled student (takes_w) is called once, with w as its input."""

    def __init__(self, network, labels, guidance, null_label, guided_at=None, takes_w=False, guide=None):
        super().__init__()
        self.network, self.labels, self.guidance, self.guided_at = network, labels, guidance, guided_at
        self.guide, self.takes_w = guide, takes_w
        self.null = None if labels is None else torch.full_like(labels, null_label)
        # once for the batch, not at every step: w = 0 or all labels null need the null pass alone
        self.unconditional = guide is None and (guidance == 0 or bool((labels == null_label).all()))

    def forward(self, x_t, t):
        w = self.guidance if self.guided_at is None or self.guided_at[int(t[0])] else 1.0
        if self.takes_w:  # a guidance-distilled student: w is its input, one pass of batch B
            labels = self.null if self.unconditional else self.labels
            return self.network(x_t, t, labels, torch.full(t.shape, float(w), device=x_t.device))
        if self.unconditional:
            return self.network(x_t, t, self.null)
        if w == 1:
            return self.network(x_t, t, self.labels)
        if self.guide is not None:
            return guided_output(self.network(x_t, t, self.labels).float(), self.guide(x_t, t, self.labels).float(), w)
        return guided_output(*conditional_and_unconditional(self.network, x_t, t, self.labels, self.null), w)


def conditional_and_unconditional(network, x_t, t, labels, null):
    """The network's outputs at x_t for the labels (B,) and for the null labels (B,), as one
    call of batch 2B: (conditional, unconditional), each (B, C, H, W) in fp32."""
    both = network(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    return both.float().chunk(2)  # (2B, ...) -> 2 x (B, ...)


def guided_output(output, guide_output, w):
    """The guided output from the network's output and its guide's, w a number or (B, 1, 1, 1):
    Ho & Salimans 2022 eq. 6 with the unconditional output as the guide, Karras et al. 2024's
    autoguidance with a weaker network's (Guided). With the unconditional guide it is also the
    target a guidance-distilled student learns in one pass (Meng et al. 2023 eq. 6)."""
    return guide_output + w * (output - guide_output)
