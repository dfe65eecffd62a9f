"""Register Pascal Context (VOC2010 images): ``pascal_context_{59,459}_sem_seg_{train,val}``.

Layout under ``$DETECTRON2_DATASETS``, written by ``datasets/prepare_pascal_context.py``::

    VOCdevkit/VOC2010/JPEGImages/*.jpg
    VOCdevkit/VOC2010/annotations_detectron2/pc459_{train,val}/*.tif   16-bit, 0..458, ignore 65535
    VOCdevkit/VOC2010/annotations_detectron2/pc59_{train,val}/*.png    8-bit, 0..58, ignore 255

The 459 classes are those of the upstream ``labels.txt`` (full Pascal Context, id ``k`` there is
contiguous id ``k - 1``); the 59 are the usual frequent subset (every class outside it → ignore).
Train / val are the VOC2010 ``ImageSets/Main`` splits (4998 / 5105 images).
"""

from pathlib import Path
from typing import Dict, Optional

from .benchmark_utils import register_sem_seg
from .register_toyworld import datasets_root

__all__ = [
    "PASCAL_CONTEXT_459_CLASSES",
    "PASCAL_CONTEXT_59_CLASSES",
    "PASCAL_CONTEXT_DIR",
    "pascal_context_metadata",
    "register_pascal_context",
]

PASCAL_CONTEXT_DIR = "VOCdevkit/VOC2010"
PREPARE_CMD = "python datasets/prepare_pascal_context.py"


def _names(text: str):
    return tuple(n.strip() for n in text.replace("\n", " ").split(",") if n.strip())


# upstream labels.txt order (1-based there)
PASCAL_CONTEXT_459_CLASSES = _names("""
accordion, aeroplane, air conditioner, antenna, artillery, ashtray, atrium, baby carriage,
bag, ball, balloon, bamboo weaving, barrel, baseball bat, basket, basketball backboard,
bathtub, bed, bedclothes, beer, bell, bench, bicycle, binoculars, bird, bird cage, bird
feeder, bird nest, blackboard, board, boat, bone, book, bottle, bottle opener, bowl, box,
bracelet, brick, bridge, broom, brush, bucket, building, bus, cabinet, cabinet door, cage,
cake, calculator, calendar, camel, camera, camera lens, can, candle, candle holder, cap,
car, card, cart, case, casette recorder, cash register, cat, cd, cd player, ceiling, cell
phone, cello, chain, chair, chessboard, chicken, chopstick, clip, clippers, clock, closet,
cloth, clothes tree, coffee, coffee machine, comb, computer, concrete, cone, container,
control booth, controller, cooker, copying machine, coral, cork, corkscrew, counter, court,
cow, crabstick, crane, crate, cross, crutch, cup, curtain, cushion, cutting board, dais,
disc, disc case, dishwasher, dock, dog, dolphin, door, drainer, dray, drink dispenser,
drinking machine, drop, drug, drum, drum kit, duck, dumbbell, earphone, earrings, egg,
electric fan, electric iron, electric pot, electric saw, electronic keyboard, engine,
envelope, equipment, escalator, exhibition booth, extinguisher, eyeglass, fan, faucet, fax
machine, fence, ferris wheel, fire extinguisher, fire hydrant, fire place, fish, fish tank,
fishbowl, fishing net, fishing pole, flag, flagstaff, flame, flashlight, floor, flower, fly,
foam, food, footbridge, forceps, fork, forklift, fountain, fox, frame, fridge, frog, fruit,
funnel, furnace, game controller, game machine, gas cylinder, gas hood, gas stove, gift box,
glass, glass marble, globe, glove, goal, grandstand, grass, gravestone, ground, guardrail,
guitar, gun, hammer, hand cart, handle, handrail, hanger, hard disk drive, hat, hay,
headphone, heater, helicopter, helmet, holder, hook, horse, horse-drawn carriage, hot-air
balloon, hydrovalve, ice, inflator pump, ipod, iron, ironing board, jar, kart, kettle, key,
keyboard, kitchen range, kite, knife, knife block, ladder, ladder truck, ladle, laptop,
leaves, lid, life buoy, light, light bulb, lighter, line, lion, lobster, lock, machine,
mailbox, mannequin, map, mask, mat, match book, mattress, menu, metal, meter box,
microphone, microwave, mirror, missile, model, money, monkey, mop, motorbike, mountain,
mouse, mouse pad, musical instrument, napkin, net, newspaper, oar, ornament, outlet, oven,
oxygen bottle, pack, pan, paper, paper box, paper cutter, parachute, parasol, parterre,
patio, pelage, pen, pen container, pencil, person, photo, piano, picture, pig, pillar,
pillow, pipe, pitcher, plant, plastic, plate, platform, player, playground, pliers, plume,
poker, poker chip, pole, pool table, postcard, poster, pot, pottedplant, printer, projector,
pumpkin, rabbit, racket, radiator, radio, rail, rake, ramp, range hood, receiver, recorder,
recreational machines, remote control, road, robot, rock, rocket, rocking horse, rope, rug,
ruler, runway, saddle, sand, saw, scale, scanner, scissors, scoop, screen, screwdriver,
sculpture, scythe, sewer, sewing machine, shed, sheep, shell, shelves, shoe, shopping cart,
shovel, sidecar, sidewalk, sign, signal light, sink, skateboard, ski, sky, sled, slippers,
smoke, snail, snake, snow, snowmobiles, sofa, spanner, spatula, speaker, speed bump, spice
container, spoon, sprayer, squirrel, stage, stair, stapler, stick, sticky note, stone,
stool, stove, straw, stretcher, sun, sunglass, sunshade, surveillance camera, swan, sweeper,
swim ring, swimming pool, swing, switch, table, tableware, tank, tap, tape, tarp, telephone,
telephone booth, tent, tire, toaster, toilet, tong, tool, toothbrush, towel, toy, toy car,
track, train, trampoline, trash bin, tray, tree, tricycle, tripod, trophy, truck, tube,
turtle, tvmonitor, tweezers, typewriter, umbrella, unknown, vacuum cleaner, vending machine,
video camera, video game console, video player, video tape, violin, wakeboard, wall, wallet,
wardrobe, washing machine, watch, water, water dispenser, water pipe, water skate board,
watermelon, whale, wharf, wheel, wheelchair, window, window blinds, wineglass, wire, wood,
wool""")
PASCAL_CONTEXT_59_CLASSES = _names("""
aeroplane, bag, bed, bedclothes, bench, bicycle, bird, boat, book, bottle, building, bus,
cabinet, car, cat, ceiling, chair, cloth, computer, cow, cup, curtain, dog, door, fence,
floor, flower, food, grass, ground, horse, keyboard, light, motorbike, mountain, mouse,
person, plate, platform, pottedplant, road, rock, sheep, shelves, sidewalk, sign, sky, snow,
sofa, table, track, train, tree, truck, tvmonitor, wall, water, window, wood""")

# vocabulary -> (ground-truth folder prefix, extension, ignore label, bit depth)
_VARIANTS = {
    59: (PASCAL_CONTEXT_59_CLASSES, "pc59", "png", 255, 8),
    459: (PASCAL_CONTEXT_459_CLASSES, "pc459", "tif", 65535, 16),
}


def pascal_context_metadata(num_classes: int) -> Dict:
    """Metadata of Pascal Context 59 or 459 (no seen/unseen split: a cross-dataset benchmark)."""
    classes, _, _, ignore, depth = _VARIANTS[num_classes]
    return {
        "stuff_classes": list(classes),
        "ignore_label": ignore,
        "sem_seg_bit_depth": depth,
        "evaluator_type": "ov_sem_seg",
    }


def register_pascal_context(root: Optional[Path] = None) -> None:
    """Register ``pascal_context_{59,459}_sem_seg_{train,val}`` under ``root``."""
    base = Path(root if root is not None else datasets_root()) / PASCAL_CONTEXT_DIR
    for num_classes, (_, prefix, ext, _, _) in _VARIANTS.items():
        for split in ("train", "val"):
            register_sem_seg(
                f"pascal_context_{num_classes}_sem_seg_{split}",
                image_dir=base / "JPEGImages",
                gt_dir=base / "annotations_detectron2" / f"{prefix}_{split}",
                gt_ext=ext,
                image_ext="jpg",
                prepare_cmd=PREPARE_CMD,
                metadata=pascal_context_metadata(num_classes),
            )


register_pascal_context()
