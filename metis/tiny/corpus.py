"""Natural questions outside the shapes world, labelled think or direct, for the router.

Modelled on what the paper's benchmarks hold: MathVista/MathVerse/WeMath-style word problems,
geometry, chart and table arithmetic, logic and science calculations go to the thinking expert;
MMBench/OCRBench-style captions, recognition, reading text, colours, small counts, yes/no and
document look-ups go to the direct expert. Each kind has templates in three disjoint pools (as in
`phrasing.py`) and fillers drawn per question, so the router learns what a question asks for, not
its exact words. The tiny model cannot answer any of them; it learns to say so in one sentence.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from metis.tiny import phrasing

REFUSAL = "I can only answer questions about the coloured shapes I was trained on."
OFF_WORLD_CHAIN = "not about the shapes."

F = {  # shared fillers
    "n": [str(n) for n in range(2, 60)],
    "item": ["apples", "pencils", "books", "oranges", "cookies", "stickers", "marbles", "tickets", "eggs", "coins"],
    "name": ["Tom", "Anna", "Li", "Maria", "Sam", "Priya", "Omar", "Emma", "Ken", "Sara"],
    "animal": ["dog", "cat", "horse", "bird", "cow", "zebra", "elephant", "sheep"],
    "thing": ["car", "shirt", "umbrella", "bus", "door", "cup", "flower", "balloon", "bike", "hat"],
    "person": ["man", "woman", "child", "girl", "boy", "person on the left", "player"],
    "place": ["kitchen", "beach", "street", "park", "office", "airport", "forest", "market", "restaurant",
              "train station", "classroom", "living room", "garden", "stadium", "harbour", "museum"],
    "mood": ["happy", "sad", "angry", "surprised", "scared", "bored", "tired", "calm", "excited", "worried"],
    "doc": ["invoice", "receipt", "letter", "form", "menu", "ticket", "poster", "label"],
    "field": ["date", "total", "name", "address", "phone number", "title", "price", "order number"],
    "chart": ["bar chart", "line chart", "pie chart", "table", "graph", "plot"],
    "year": [str(y) for y in range(1990, 2025)],
    "shape2d": ["triangle", "rectangle", "circle", "trapezoid", "parallelogram", "square"],
    "unit": ["cm", "m", "inches", "km"],
    "obj": ["people", "cars", "birds", "chairs", "trees", "windows", "boats", "cups"],
}

# kind -> (label, {pool: templates}). Placeholders name keys of F; a trailing digit makes a
# second draw of the same filler ({n2}, {name2}).
KINDS: dict[str, tuple[str, dict[str, tuple[str, ...]]]] = {
    # --- thinking expert: several steps of reasoning or calculation
    "word_problem": ("think", {
        "train": ("{name} buys {n} {item} at {n2} dollars each. How much does {name} spend?",
                  "{name} reads {n} pages a day. How many days does a {n2}-page book take?",
                  "If {n} workers finish a job in {n2} days, how long would {n3} workers need?",
                  "{name} and {name2} split {n} {item} so that {name} gets {n2} more. How many does each get?",
                  "{name} has {n} {item} and buys {n2} more. How many {item} does {name} have now?",
                  "{name} had {n} {item}, gave away {n2}, then got {n3}. How many are left?",
                  "If each box holds {n} {item} and there are {n2} boxes, how many {item} are there?",
                  "A class shares {n} {item} equally among {n2} students. How many does each get?"),
        "val": ("{name} saves {n} dollars a week. How many weeks until {name} has {n2} dollars?",
                "{name} collects {n} {item} a day for {n2} days. How many in total?",),
        "test": ("{name} owns {n} {item}; {name2} owns {n2} more than {name}. How many do they own together?",
                 "There are {n} {item} in a basket and {n2} are eaten. How many remain?"),
    }),
    "percent": ("think", {
        "train": ("Which is cheaper per item, {n} for {n2} dollars or {n3} for {n4} dollars?",
                  "A jacket costs {n} dollars and is {n2}% off. What is the sale price?",
                  "What is {n}% of {n2}?", "A price rises from {n} to {n2}. By what percent did it increase?"),
        "val": ("After a {n}% discount a book costs {n2} dollars. What was the original price?",),
        "test": ("If {n2} students are {n}% of a school, how many students are there?",
                 "How much is a {n}% tip on a bill of {n2} dollars?"),
    }),
    "speed": ("think", {
        "train": ("A train travels {n} km in {n2} hours. What is its average speed?",
                  "A car drives at {n} km per hour for {n2} hours. How far does it go?",
                  "How long does it take to walk {n} km at {n2} km per hour?"),
        "val": ("A cyclist rides {n} km at {n2} km/h. How many hours does the ride take?",),
        "test": ("Two trains leave {n} km apart and approach at {n2} km/h each. When do they meet?",
                 "If a plane flies {n} km in {n2} minutes, what is its speed in km per hour?"),
    }),
    "age": ("think", {
        "train": ("{name} is {n} years older than {name2}. In {n2} years their ages add to {n3}. How old is {name2}?",
                  "{name} is twice as old as {name2}, who is {n}. How old will {name} be in {n2} years?"),
        "val": ("The sum of the ages of {name} and {name2} is {n}; {name} is {n2} years older. Find both ages.",),
        "test": ("{n} years ago {name} was half the age of {name2}, who is {n2} now. How old is {name}?",),
    }),
    "area": ("think", {
        "train": ("What is the area of a {shape2d} with sides {n} {unit} and {n2} {unit}?",
                  "Find the area of the {shape2d} in the figure.",
                  "The radius of the circle is {n} {unit}. What is its area?",
                  "Calculate the area of the shaded region."),
        "val": ("A rectangle has a perimeter of {n} {unit} and a width of {n2} {unit}. What is its area?",),
        "test": ("How large is the area of the {shape2d} shown if its base is {n} {unit}?",
                 "Work out the area enclosed by the {shape2d}."),
    }),
    "angle": ("think", {
        "train": ("In the triangle two angles are {n} and {n2} degrees. What is the third angle?",
                  "Find the measure of angle ABC in the figure.",
                  "Lines AB and CD are parallel and angle 1 is {n} degrees. What is angle 2?"),
        "val": ("What is the size of angle x if the other angles are {n} and {n2} degrees?",),
        "test": ("As shown in the diagram, angle A is {n} degrees. Find angle B.",
                 "Determine the missing angle of the quadrilateral."),
    }),
    "pythagoras": ("think", {
        "train": ("A right triangle has legs {n} and {n2}. How long is the hypotenuse?",
                  "A ladder {n} m long leans on a wall with its foot {n2} m away. How high does it reach?"),
        "val": ("Find the diagonal of a rectangle with sides {n} and {n2}.",),
        "test": ("What is the distance between the points ({n}, {n2}) and ({n3}, {n4})?",),
    }),
    "perimeter": ("think", {
        "train": ("A square has sides of {n} {unit}. What is its perimeter?",
                  "The sides of a triangle are {n}, {n2} and {n3} {unit}. How long is its perimeter?",
                  "What is the distance around a regular hexagon with side {n} {unit}?",
                  "A round track has a radius of {n} m. How long is one lap?",
                  "How much ribbon goes around a frame {n} {unit} wide and {n2} {unit} tall?",
                  "Using the diagram, work out the length of the {shape2d}'s boundary.",
                  "What is the perimeter of a {shape2d} with sides {n} {unit} and {n2} {unit}?",
                  "Find the circumference of a circle with diameter {n} {unit}."),
        "val": ("A rectangle is {n} by {n2} {unit}. What is the length around it?",
                "How much fence is needed around a field {n} m by {n2} m?",),
        "test": ("Compute the perimeter of the figure shown.",),
    }),
    "chart_math": ("think", {
        "train": ("What is the percentage change from {year} to {year2} in the {chart}?",
                  "How many units taller is the highest bar than the lowest one?",
                  "Add the values for {year} and {year2} in the {chart}.",
                  "According to the {chart}, what share of the total does the biggest category have?",
                  "What is the median of the values in the {chart}?",
                  "If the trend in the {chart} goes on, what value do you expect in {year}?",
                  "By what factor did the value grow from {year} to {year2}?",
                  "According to the {chart}, how much higher was the value in {year} than in {year2}?",
                  "What is the difference between the largest and smallest bar in the {chart}?",
                  "Using the {chart}, what is the average of the values shown?",
                  "By how much did sales grow between {year} and {year2} in the {chart}?"),
        "val": ("How much did the value drop between {year} and {year2} in the {chart}?",
                "What is the sum of the two highest values in the {chart}?",),
        "test": ("Based on the {chart}, what is the ratio of the first value to the last one?",
                 "From the {chart}, compute the total over all years."),
    }),
    "table_math": ("think", {
        "train": ("In the table, what is the total of the column for {year}?",
                  "What is the mean of the numbers in the second row of the table?",
                  "Which row of the table has the highest total, and by how much?"),
        "val": ("Add up the prices in the table and subtract the discount.",),
        "test": ("Using the table, find how much more the first item costs than the last.",),
    }),
    "logic": ("think", {
        "train": ("{name} is taller than {name2}, and {name2} is taller than {name3}. Who is the shortest?",
                  "If all cats are animals and some animals are black, must some cats be black?",
                  "Three boxes are labelled wrongly. Which box should you open first to fix the labels?"),
        "val": ("{name} sits left of {name2}, and {name3} sits right of {name2}. Who is in the middle?",),
        "test": ("Exactly one of {name} and {name2} tells the truth. {name} says {name2} lies. Who is honest?",),
    }),
    "sequence": ("think", {
        "train": ("Continue the series {n}, {n2}, {n3}: what are the next two numbers?",
                  "Which number does not fit the pattern {n}, {n2}, {n3}, {n4}?",
                  "What is the 10th term of the arithmetic sequence that starts {n}, {n2}?",
                  "Each term is double the one before. Starting from {n}, what is the fifth term?",
                  "What number comes next: {n}, {n2}, {n3}, ...?", "Find the pattern and the next term of the sequence.",
                  "Which figure continues the pattern?"),
        "val": ("Give the next term: {n}, {n2}, {n3}.",
                "What is the missing number in the sequence shown?",),
        "test": ("Work out the rule of the sequence and give the next value.",),
    }),
    "probability": ("think", {
        "train": ("Two dice are rolled. What is the probability that the sum is {n}?",
                  "A bag holds {n} red and {n2} blue balls. What is the chance of drawing red twice?",
                  "If a coin is tossed {n} times, what is the probability of all heads?"),
        "val": ("What is the probability of drawing an ace from a deck of cards?",),
        "test": ("A spinner has {n} equal parts and {n2} are green. What are the odds of landing on green?",),
    }),
    "equation": ("think", {
        "train": ("Solve for x: {n}x + {n2} = {n3}.", "What value of x satisfies x^2 - {n}x + {n2} = 0?",
                  "Solve the system of equations shown in the image."),
        "val": ("If 3y - {n} = {n2}, what is y?",),
        "test": ("Find x when {n} - 2x equals {n2}.", "Solve the equation in the picture step by step."),
    }),
    "fraction": ("think", {
        "train": ("Is {n}/{n2} more or less than one half?",
                  "What is 3/4 plus 2/5?", "Simplify the fraction {n}/{n2}.", "What is {n}/{n2} of {n3}?"),
        "val": ("Which is bigger, 5/8 or 3/5, and by how much?",),
        "test": ("Multiply 2/3 by {n}/{n2} and simplify.",),
    }),
    "science_calc": ("think", {
        "train": ("A force of {n} N acts on a {n2} kg mass. What is the acceleration?",
                  "An object of mass {n} g has volume {n2} cm3. What is its density?",
                  "How much energy is needed to heat {n} g of water by {n2} degrees?"),
        "val": ("A resistor of {n} ohms carries {n2} A. What is the voltage?",),
        "test": ("If a ball is dropped from {n} m, how long until it hits the ground?",
                 "What is the kinetic energy of a {n} kg object moving at {n2} m/s?"),
    }),
    "receipt_math": ("think", {
        "train": ("How much did the {n} items on the receipt cost altogether?",
                  "The receipt shows a {n}% service charge. How many dollars is that?",
                  "How much more is the total than the subtotal on the {doc}?",
                  "What is the average price of the items on this {doc}?",
                  "How much would two of each item on the {doc} cost?",
                  "{name} pays with {n} dollars. How much change is due according to the receipt?",
                  "Split the total on the {doc} three ways: how much is each share?",
                  "What is the total on the {doc} after adding a {n}% tip?",
                  "If the bill is split between {n} people, how much does each pay?",
                  "How much change do you get from {n} dollars for the items on the receipt?"),
        "val": ("How much would three of the first item on the receipt cost?",
                "Add the tax to the subtotal on the receipt. What do you get?",),
        "test": ("After the discount on the receipt, what is the price per item?",),
    }),
    "time_calc": ("think", {
        "train": ("A movie starts at {n}:15 and lasts {n2} minutes. When does it end?",
                  "How many days are there between March {n} and May {n2}?",
                  "If it is {n} o'clock now, what time will it be in {n2} hours?"),
        "val": ("A train leaves at 9:40 and arrives at 13:05. How long is the trip?",),
        "test": ("How many minutes pass from 7:45 to 10:20?",),
    }),
    "calculus": ("think", {
        "train": ("What is the derivative of x^{n} + {n2}x?", "Evaluate the integral of {n}x from 0 to {n2}.",
                  "Find the limit of (x^2 - {n}) / (x - 2) as x approaches 2."),
        "val": ("At what x does the function in the graph reach its maximum?",),
        "test": ("Differentiate the function shown and find its slope at x = {n}.",),
    }),
    # --- direct expert: perception and look-up
    "caption": ("direct", {
        "train": ("Can you describe what you see?",
                  "Tell me what this photo is of.",
                  "What's in the image?",
                  "Give me a caption for this.",
                  "Describe the scene in one line.",
                  "Write alt text for this image.",
                  "Describe the picture for someone who cannot see it.",
                  "What is shown in this photo?",
                  "Describe this image.", "What is in this picture?", "Write a short caption for the photo.",
                  "What does this image show?", "Give a one-sentence description of the picture."),
        "val": ("Describe what the picture shows.",
                "Caption this photo.",),
        "test": ("Briefly, what is happening in the image?", "Summarise the photo in a few words."),
    }),
    "recognise": ("direct", {
        "train": ("Is this a {animal} or a {animal2}?",
                  "What animal is this?", "What is the object in the middle?", "What kind of {thing} is shown?",
                  "Which animal is in the photo?", "What is this thing?"),
        "val": ("Identify the object in the photo.",),
        "test": ("Name the animal in the picture.", "What breed is the {animal}?"),
    }),
    "scene": ("direct", {
        "train": ("What type of place is this?",
                  "Which room of the house is this?",
                  "Is this in a city or in the countryside?",
                  "Where are these people?",
                  "Was this picture taken at a {place}?",
                  "Does this look like a {place} to you?",
                  "Where could this be?",
                  "Where was this photo taken?", "Is this indoors or outdoors?", "What place is shown here?",
                  "Is this a {place}?"),
        "val": ("Where is this?",
                "What kind of room is this?",),
        "test": ("In what setting does this scene take place?",),
    }),
    "ocr": ("direct", {
        "train": ("What is the text on the {doc}?",
                  "Can you read what it says on the {thing}?",
                  "What does the writing at the top say?",
                  "Read out the words in the picture.",
                  "What is the headline?",
                  "What number is written on the {thing}?",
                  "Type out the words you see.",
                  "What name is on the sign?",
                  "What does the label say?",
                  "What does the sign say?", "Read the text in the image.", "What is written on the {thing}?",
                  "What word is on the banner?", "Transcribe the text."),
        "val": ("Read me the text on the {thing}.",
                "What are the words on the sign?",),
        "test": ("Which text is printed on the {thing}?", "Copy out the writing in the picture."),
    }),
    "object_colour": ("direct", {
        "train": ("What colour is the {thing}?", "What color is the {animal}?", "Which colour is the {person}'s shirt?",
                  "What is the colour of the {thing} in the photo?"),
        "val": ("What color is the {thing} on the left?",),
        "test": ("Tell me the color of the {thing}.", "Which colour does the {animal} have?"),
    }),
    "small_count": ("direct", {
        "train": ("Tell me the number of {obj} you can see.",
                  "Give the number of {animal}s in the picture.",
                  "How many {obj} are in the photo?", "How many {obj} can you see?", "Count the {obj}.",
                  "How many {animal}s are there?"),
        "val": ("What is the number of {obj} in the image?",),
        "test": ("How many {obj} does this photo show?",),
    }),
    "yes_no": ("direct", {
        "train": ("Is the photo in colour or black and white?",
                  "Is there a {animal} in the image?", "Is the {person} smiling?", "Is it raining?",
                  "Does the {person} wear glasses?", "Is the {thing} open?"),
        "val": ("Can you see a {thing} here?",),
        "test": ("Does this photo contain a {animal}?", "Is the light on?"),
    }),
    "doc_lookup": ("direct", {
        "train": ("What date is on the {doc}?",
                  "Who is the {doc} addressed to?",
                  "Which company issued the {doc}?",
                  "Look up the {field} on this {doc} for me.",
                  "Where does the {doc} say to go?",
                  "What is the {field} on the {doc}?", "Who signed the {doc}?", "What is the {field} shown?",
                  "Find the {field} in the {doc}."),
        "val": ("Which {field} appears on the {doc}?",),
        "test": ("Read off the {field} from the {doc}.", "What {field} is printed on this {doc}?"),
    }),
    "chart_read": ("direct", {
        "train": ("What is the title of the {chart}?", "What is the label of the x-axis?",
                  "Which colour is the largest slice of the {chart}?", "What does the legend say?"),
        "val": ("What is the unit on the y-axis of the {chart}?",),
        "test": ("What is the {chart} called?",),
    }),
    "activity": ("direct", {
        "train": ("Is the {animal} standing or lying down?",
                  "Is the {person} sitting or standing?",
                  "What is the {person} doing?", "What sport is being played?", "What is the {animal} doing?"),
        "val": ("What activity is shown?",),
        "test": ("What is the {person} holding?",),
    }),
    "clothing": ("direct", {
        "train": ("Is the {person} wearing a jacket or a coat?",
                  "What is the {person} wearing?", "Is the {person} wearing a hat?", "What kind of shoes are these?"),
        "val": ("What does the {person} have on?",),
        "test": ("Describe the {person}'s clothes.",),
    }),
    "emotion": ("direct", {
        "train": ("Is the {person} angry?",
                  "What emotion is the {person} showing?",
                  "Does the {person} seem {mood}?",
                  "How is the {person} feeling?",
                  "Is the {person} laughing?",
                  "What feeling does this picture give?",
                  "Does the {animal} look scared?",
                  "Is the {person} in a good mood?",
                  "How does the {person} feel?", "Does the {person} look happy?", "What is the mood of the photo?"),
        "val": ("Does the {person} look upset?",
                "What expression does the {person} have?",),
        "test": ("Is the {person} sad or happy?",),
    }),
    "weather": ("direct", {
        "train": ("Is the sky clear or cloudy?",
                  "Is it cloudy?",
                  "Is it snowing in the picture?",
                  "What is the sky like?",
                  "Is the weather good or bad?",
                  "Is it windy?",
                  "Are there clouds in the sky?",
                  "What is the weather like?", "Is it sunny?", "What season is it in the picture?"),
        "val": ("Is it raining or dry?",
                "Is it day or night?",),
        "test": ("Does it look cold outside?",),
    }),
    "brand": ("direct", {
        "train": ("What brand is the {thing}?", "Which company's logo is this?", "What is the name of the shop?"),
        "val": ("Whose logo is on the {thing}?",),
        "test": ("What make is the {thing}?",),
    }),
    "landmark": ("direct", {
        "train": ("Which landmark is this?", "What city is this?", "What is the name of this building?"),
        "val": ("Which famous place is shown?",),
        "test": ("Where in the world is this monument?",),
    }),
}


@dataclass(frozen=True)
class Question:
    text: str
    label: str  # "think" or "direct"
    kind: str


def _fill(rng: random.Random, template: str) -> str:
    slots = {}
    for key in F:
        for suffix in ("", "2", "3", "4"):
            slot = key + suffix
            if "{" + slot + "}" in template:
                slots[slot] = rng.choice(F[key])
    return template.format(**slots)


def question(rng: random.Random, pool: str, label: str | None = None) -> Question:
    """One natural question from `pool`; `label=None` draws think and direct equally often."""
    label = label or rng.choice(("think", "direct"))
    kind = rng.choice([k for k, (lab, _) in KINDS.items() if lab == label])
    text = _fill(rng, rng.choice(KINDS[kind][1][pool]))
    return Question(phrasing.surface(rng, text, pool, typo_rate=0.05), label, kind)


def generate(pool: str, n: int, seed: int = 0) -> list[Question]:
    """A label-balanced list; the same (pool, n, seed) always gives the same questions."""
    rng = random.Random(f"corpus-{pool}-{seed}")
    return [question(rng, pool, ("think", "direct")[i % 2]) for i in range(n)]


def target(thinking: bool) -> str:
    """The model's honest reply: a thinking expert notes why, then both give the same sentence."""
    return f"<think>{OFF_WORLD_CHAIN if thinking else ''}</think><answer>{REFUSAL}</answer>"
