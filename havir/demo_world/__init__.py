"""The demo world: small networks trained on the synthetic scenes (:mod:`havir.nsd.scenes`).

Nothing here measures anything about real brains or real images. These models exist so that the
offline demo can show (and tests can check) what the method does on a world whose content is
known exactly:

* :mod:`havir.demo_world.probe`: a scene probe reading a picture's background and object kinds,
  for the demo's *content accuracy* and *object-kind F1* (demo measures, never protocol metrics);
* :mod:`havir.demo_world.clip`: a miniature CLIP (text and image towers) trained on the scenes
  and their captions, in the layout of a Versatile Diffusion folder's CLIP parts.

The plan for the rest (a trained miniature dual UNet) is in ``docs/miniature-vd.md``.
"""
