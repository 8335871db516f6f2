"""`builtin:prose`: a fixed held-out text, to see capability loss.

Alignment on a narrow task can buy reward with general language ability: a model that learns to satisfy "answer in
lowercase" may also get worse at ordinary English. The evaluation's `nll_dataset` measures the policy's and the
reference's negative log-likelihood per token on a text neither was trained on; a rise (`nll_change` in eval.json)
is capability lost. This is that text: 24 short expository paragraphs on everyday science, history and practical
topics, written for alignlab (so no model saw them in pretraining; their facts are textbook-level), plain English,
about 2,200 words.

Split `text` only: rows {"text": paragraph}; n rows are the first n paragraphs (repeated from the start past 24),
whatever the seed, so every recipe measures the same text. No reward function: it is for measuring, not training.
Standard library only.
"""

from __future__ import annotations

import random

PROSE_SPLITS = ("text",)

PARAGRAPHS = (
    "Bread rises because of yeast, a single-celled fungus that feeds on the sugars in flour. As it eats, it releases "
    "carbon dioxide, and the gas is trapped by a stretchy network of gluten proteins that forms when the dough is "
    "kneaded. The longer the dough rests in a warm place, the more gas collects and the lighter the loaf becomes. "
    "Baking then kills the yeast, sets the gluten and turns the surface brown through reactions between sugars and "
    "proteins.",
    "The water cycle moves water between the oceans, the air and the land. Sunlight warms the surface of the sea, "
    "and some of the water evaporates into the atmosphere. As the moist air rises it cools, and the vapour condenses "
    "into tiny droplets that form clouds. When the droplets grow heavy enough they fall as rain or snow. Some of that "
    "water soaks into the ground, some runs off into rivers, and in time most of it returns to the sea.",
    "A lighthouse warns ships away from rocks and shallow water at night. Early lighthouses burned wood or coal in an "
    "open fire, which gave a weak and unsteady light. In the nineteenth century, lenses made of many curved glass "
    "rings began to gather the light of a single lamp into a strong beam that could be seen for miles. Each "
    "lighthouse flashes in its own pattern, so sailors can tell which one they are looking at.",
    "Honeybees live in colonies of many thousands, with one queen that lays the eggs. Worker bees collect nectar and "
    "pollen from flowers, and they tell each other where to find food by a dance that points in the direction of the "
    "source. Back in the hive, they turn nectar into honey by adding enzymes and fanning it with their wings until "
    "much of the water has evaporated. The honey feeds the colony through the winter.",
    "Maps are drawn to a scale, which tells the reader how a distance on paper compares with a distance on the "
    "ground. A map of a city might show one centimetre for every hundred metres, while a map of a whole country "
    "needs a much smaller scale. Because the earth is round and paper is flat, every world map stretches some "
    "regions. Different projections make different trade-offs between keeping shapes, areas and directions true.",
    "Compost is made when bacteria, fungi and small animals break down plant waste. A good heap mixes green material, "
    "such as grass clippings and vegetable peels, with brown material, such as dry leaves and cardboard. The green "
    "part supplies nitrogen and the brown part supplies carbon. Turning the heap lets air in, which keeps the "
    "microbes active and the smell mild. After a few months the waste becomes a dark, crumbly soil that feeds plants.",
    "The printing press changed how ideas spread in Europe. Before it, books were copied by hand, which was slow and "
    "expensive, so few people owned any. Movable metal type allowed a workshop to set a page once and print hundreds "
    "of copies. Prices fell, more people learned to read, and news, maps and scientific work could travel quickly "
    "between cities. Within a few decades, printing shops had opened in most large towns.",
    "A rainbow appears when sunlight shines through raindrops while the sun is behind the observer. Each drop bends "
    "the light as it enters, reflects it from the back surface and bends it again as it leaves. Because each colour "
    "bends by a slightly different amount, white light spreads into a band of colours. Red always appears on the "
    "outside of the main bow and violet on the inside, and a fainter second bow sometimes shows the colours reversed.",
    "Saving money regularly is easier when it happens automatically. Many people arrange for a fixed amount to move "
    "into a savings account on the day they are paid, before they have a chance to spend it. Small amounts add up "
    "over months and years, especially when the account pays interest. Keeping a few months of expenses aside also "
    "makes an unexpected bill, such as a car repair, much less stressful.",
    "Volcanoes form where molten rock from deep inside the earth reaches the surface. Some erupt explosively, "
    "throwing ash high into the sky, because their thick magma traps gas until the pressure becomes too great. "
    "Others release runny lava that flows steadily down their slopes. Volcanic soil is often very fertile, which is "
    "one reason why farms and towns are found near volcanoes despite the danger.",
    "Trains run on steel rails because steel wheels on steel tracks roll with very little friction. A locomotive can "
    "therefore pull many heavy wagons with far less energy than trucks would need on a road. The flanges on the "
    "inside of each wheel keep the train on the track, and points, which are movable sections of rail, guide it from "
    "one line to another. Signals along the route keep trains a safe distance apart.",
    "Learning a new language goes faster with short, frequent practice than with long, rare sessions. Memory "
    "strengthens each time a word is recalled just before it would have been forgotten, which is why flash cards "
    "that return at growing intervals work well. Listening to simple conversations, reading short texts and speaking "
    "aloud, even with mistakes, all help. Most learners understand far more than they can say for a long time.",
    "The moon has no light of its own; it shines by reflecting sunlight. As it travels around the earth once a month, "
    "we see different amounts of its sunlit half, which gives the phases from new moon to full moon and back. The "
    "same side of the moon always faces the earth, because the moon turns on its axis exactly once for every orbit. "
    "Its gravity, together with the sun's, raises the tides in the oceans.",
    "A well-made cup of tea depends on the water temperature and the steeping time. Black tea is usually brewed with "
    "water just off the boil for three to five minutes, while green tea tastes better with cooler water and a "
    "shorter steep, which keeps it from turning bitter. Loose leaves need room to unfold, so a roomy strainer or pot "
    "works better than a tight infuser. Milk, lemon or nothing at all is a matter of taste.",
    "Glaciers are rivers of ice that move slowly downhill under their own weight. They form where more snow falls in "
    "winter than melts in summer, so that layers build up and are pressed into dense ice. As a glacier moves, it "
    "scrapes the ground beneath it and carries rocks along, carving deep valleys with steep sides and flat floors. "
    "When the climate warms, glaciers retreat and leave behind lakes and heaps of loose stone.",
    "Public libraries lend books for free, but most now offer much more. Visitors can use computers, borrow films "
    "and music, read newspapers and join reading groups or language classes. Librarians help people find reliable "
    "information, fill in forms and learn to use new technology. For many towns, the library is one of the few "
    "indoor places where anyone can spend time without paying.",
    "Bicycles are among the most efficient machines ever built. A rider turns the pedals, the chain carries that "
    "motion to the rear wheel, and gears let the rider choose between easy pedalling uphill and speed on the flat. "
    "Air-filled tyres absorb bumps and grip the road. Regular care is simple: keep the tyres pumped, the chain "
    "cleaned and oiled, and the brakes adjusted so that they stop the wheel firmly.",
    "Coral reefs are built by tiny animals called polyps, which take calcium from seawater and build hard skeletons "
    "around themselves. Over thousands of years these skeletons pile up into vast structures. Most reef-building "
    "corals live together with algae that make food from sunlight, which is why reefs grow in clear, shallow and "
    "warm water. Reefs shelter a great variety of fish and protect coasts from waves.",
    "Good sleep depends partly on habit. Going to bed and getting up at the same times each day helps the body's "
    "internal clock stay steady. Bright screens late in the evening can delay sleepiness, while daylight in the "
    "morning helps the body wake up. A cool, dark and quiet bedroom makes it easier to stay asleep, and caffeine in "
    "the afternoon can keep some people awake for hours.",
    "Thunder is the sound made by lightning. A lightning bolt heats the air along its path to a temperature hotter "
    "than the surface of the sun, in a fraction of a second. The air expands so quickly that it creates a shock wave, "
    "which we hear as a crack or a long rumble. Because light travels much faster than sound, counting the seconds "
    "between the flash and the thunder gives a rough idea of how far away the storm is.",
    "Markets have existed for thousands of years wherever people had goods to exchange. In early towns, farmers "
    "brought grain, fruit and animals to a central square on fixed days, and craftsmen sold tools, cloth and pots. "
    "Coins made trade easier than barter, because a seller no longer needed to find someone who wanted exactly what "
    "they had. Many modern cities still hold weekly markets in the same squares.",
    "Houseplants need light, water and the right soil, but the most common mistake is too much water. Roots need air "
    "as well as moisture, and soil that stays wet for days can make them rot. A simple test is to push a finger into "
    "the soil: if the top few centimetres are dry, it is time to water. Plants from deserts, such as cactus, need "
    "even less, while ferns prefer soil that stays slightly damp.",
    "Rivers shape the land they flow through. Fast mountain streams cut narrow valleys and carry stones and sand "
    "downhill. When a river reaches flatter ground it slows down, drops some of its load and begins to wind from side "
    "to side in loops. Floods spread fine mud across the surrounding plain, which is why river valleys often have "
    "rich farmland. Where a river meets the sea, the remaining sediment can build a wide delta.",
    "Writing clearly is mostly a matter of revision. A first draft gets the ideas down; a second reading shows which "
    "sentences are too long, which words are vague and which paragraphs repeat each other. Reading the text aloud "
    "helps to find awkward phrases. Short sentences and concrete examples make a point easier to follow, and a "
    "reader who is busy will be grateful if the most important information comes first.",
)


def prose_rows(split: str, n: int, seed: int) -> list[dict]:
    """The first n paragraphs (repeated past the end) as {"text": ...} rows; the seed is ignored (a fixed text)."""
    del seed
    if split not in PROSE_SPLITS:
        raise ValueError(f"unknown split {split!r} for task 'prose'; known splits: {', '.join(PROSE_SPLITS)}")
    return [{"text": PARAGRAPHS[i % len(PARAGRAPHS)]} for i in range(n)]


def _corpus(rng: random.Random, n: int) -> list[str]:
    """No strings for the builtin tokenizer: its corpus (and every cached tiny-llama build) must not change."""
    del rng, n
    return []
