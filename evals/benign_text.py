"""A fixed set of short benign paragraphs (written for this project, public domain) for CE / KL capability checks.

Fixed and shipped in code so that the capability cost of two configs, or of one config on two machines, is measured
on the same tokens without a download. Topics are everyday and neutral on purpose: the cost measured is that of
steering on ordinary text, not on the refusal sets.
"""

from __future__ import annotations

BENIGN_PARAGRAPHS: tuple[str, ...] = (
    "The kettle clicked off and the kitchen filled with steam. She poured the water over the tea leaves, waited three "
    "minutes, and carried the cup to the window, where the morning light was just reaching the garden.",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make sugar. Oxygen "
    "is released as a by-product, which is why forests and ocean algae matter so much for the air we breathe.",
    "To bake a simple loaf of bread, mix flour, water, salt and yeast, knead the dough for ten minutes, and let it "
    "rise until it has doubled in size. Shape it, let it rise again, and bake it in a hot oven for forty minutes.",
    "The train left the station at seven o'clock. Most passengers were reading or looking out at the fields, and a "
    "small boy near the door counted the cows aloud until his father gave him a book about ships.",
    "A prime number has exactly two divisors: one and itself. The first few primes are 2, 3, 5, 7, 11 and 13. Every "
    "whole number greater than one can be written as a product of primes in exactly one way.",
    "When you start running, begin slowly. Three short runs a week are better than one long one, and it helps to "
    "alternate running and walking for the first few weeks while your body gets used to the effort.",
    "The library on the corner had been there for a hundred years. Its wooden shelves creaked, its reading room "
    "smelled of paper and polish, and on rainy afternoons every chair was taken by someone lost in a story.",
    "Water boils at a lower temperature on a mountain than at sea level, because the air pressure is lower. That is "
    "why cooking instructions sometimes suggest longer times for people who live at high altitude.",
    "Our team meeting is moved to Thursday at ten. Please bring the latest figures for the spring budget and a short "
    "list of questions for the new supplier, and let me know if the time does not work for you.",
    "The river widened as it approached the sea. Herons stood in the shallows, boats rocked at their moorings, and "
    "the smell of salt grew stronger with every bend in the path along the bank.",
    "In chess, each player starts with sixteen pieces: one king, one queen, two rooks, two bishops, two knights and "
    "eight pawns. The aim is to trap the opposing king so that it cannot escape capture.",
    "Good sleep habits include going to bed at the same time each night, keeping the bedroom cool and dark, and "
    "putting screens away for half an hour before sleep. Regular exercise during the day helps too.",
    "The museum's new exhibition shows tools used by farmers two centuries ago: wooden ploughs, hand scythes, butter "
    "churns and a heavy iron kettle that once hung over an open fire.",
    "A budget starts with a list of income and regular expenses. Subtract the expenses from the income, set aside a "
    "small amount for savings, and check each month whether spending matched the plan.",
    "The city council voted to plant two hundred new trees along the main avenue. Residents said the shade would make "
    "summer walks more pleasant, and shop owners hoped more people would stroll past their windows.",
    "Light travels at about three hundred thousand kilometres per second. Even so, sunlight takes a little over eight "
    "minutes to reach the Earth, and light from the nearest stars takes years.",
)
