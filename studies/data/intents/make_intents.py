"""Writes the quickstart's intent data set: python studies/data/intents/make_intents.py

Short assistant requests in six intents, written for hpo from templates and
slot values (no third-party data). Deterministic: the seed fixes the rows.
Some templates are deliberately close across intents ("play the weather
channel", "set the lights for my alarm") so the task is not trivially easy.
"""

import csv
import random
from pathlib import Path

SLOTS = {
    "city": ["Paris", "Berlin", "Tokyo", "Lisbon", "Chicago", "Nairobi", "Oslo", "Lima", "Seoul", "Denver",
             "Cairo", "Dublin", "Austin", "Madrid", "Hanoi"],
    "day": ["today", "tomorrow", "on Saturday", "this weekend", "on Monday", "tonight", "next week",
            "on Friday morning", "this afternoon"],
    "time": ["6 am", "6:30", "7:15 tomorrow", "noon", "5 in the morning", "half past eight", "9 pm",
             "quarter to seven", "10:45"],
    "artist": ["Miles Davis", "Taylor Swift", "Bach", "Radiohead", "Fela Kuti", "Adele", "Daft Punk",
               "Nina Simone", "the Beatles", "Billie Eilish", "Ravi Shankar"],
    "genre": ["jazz", "lo-fi beats", "classical music", "some rock", "podcasts about history", "house music",
              "something relaxing", "workout songs", "country"],
    "cuisine": ["Italian", "sushi", "Thai", "vegan", "Mexican", "Ethiopian", "ramen", "pizza", "Indian",
                "seafood", "Lebanese"],
    "n": ["two", "four", "six", "3", "5", "eight", "a party of 7", "just me and my wife"],
    "amount": ["$50", "200 euros", "1,000 dollars", "£75", "twenty bucks", "$1200", "300", "15 pounds"],
    "person": ["mom", "Alex", "my landlord", "Priya", "the babysitter", "my brother", "Sam", "Jordan"],
    "account": ["checking", "savings", "my joint account", "the business account"],
    "room": ["kitchen", "living room", "bedroom", "hallway", "office", "porch", "garage", "bathroom"],
    "level": ["50 percent", "halfway", "the lowest setting", "full brightness", "20%", "a warm dim glow"],
}

TEMPLATES = {
    "weather": [
        "what's the weather in {city} {day}", "will it rain in {city} {day}", "do I need an umbrella {day}",
        "how hot will it get {day}", "forecast for {city}", "is it going to snow in {city} {day}",
        "how cold is it outside right now", "weather {day}", "should I wear a jacket {day}",
        "any storms expected in {city}", "what's the temperature in {city}", "is it sunny in {city} {day}",
        "will the wind be strong {day}", "tell me if it will be humid in {city}",
    ],
    "alarm": [
        "set an alarm for {time}", "wake me up at {time}", "cancel my {time} alarm",
        "snooze the alarm", "set a timer for 20 minutes", "remind me at {time} to leave",
        "move my alarm to {time}", "turn off all alarms", "I need to be up by {time}",
        "what alarms do I have {day}", "alarm at {time} please", "delete the alarm for {time}",
        "wake me {day} at {time}",
    ],
    "play_music": [
        "play {artist}", "put on {genre}", "play some {genre} in the {room}", "shuffle my {artist} playlist",
        "skip this song", "I want to hear {artist}", "play the new album by {artist}", "turn the music up",
        "pause the music", "play {genre} for {day}", "queue up {artist} next", "start my morning playlist",
        "play the weather channel song by {artist}",
    ],
    "book_restaurant": [
        "book a table for {n} at an {cuisine} place", "find me a {cuisine} restaurant in {city}",
        "reserve dinner for {n} {day}", "I'd like a table for {n} at {time}", "any good {cuisine} spots nearby",
        "cancel my dinner reservation {day}", "make a reservation at the {cuisine} restaurant for {time}",
        "table for {n} please", "where can I get {cuisine} {day}", "is the {cuisine} place open {day}",
        "book lunch for {n} {day} somewhere with {cuisine}",
    ],
    "transfer_money": [
        "send {amount} to {person}", "transfer {amount} from {account} to savings", "pay {person} {amount}",
        "move {amount} into {account}", "how much is in my {account}", "wire {amount} to {person} {day}",
        "split the bill with {person}, {amount} each", "pay my rent to {person}", "what did I spend {day}",
        "schedule a payment of {amount} {day}", "venmo {person} {amount} for dinner", "show my {account} balance",
    ],
    "smart_home": [
        "turn on the {room} lights", "dim the {room} lights to {level}", "switch off the lights in the {room}",
        "set the thermostat to 21 degrees", "lock the front door", "is the garage door open",
        "turn the {room} lamp to {level}", "make the {room} warmer", "close the blinds in the {room}",
        "turn off everything in the {room}", "start the robot vacuum in the {room}",
        "set the {room} lights for my {time} alarm", "turn on the fan in the {room}",
    ],
}


def fill(template: str, rng: random.Random) -> str:
    text = template.format(**{k: rng.choice(v) for k, v in SLOTS.items()})
    if rng.random() < 0.25:
        text = rng.choice(["hey, ", "please ", "can you ", "could you ", "ok so "]) + text
    if rng.random() < 0.2:
        text += rng.choice([" please", " thanks", "?", " asap", " for me"])
    return text[0].upper() + text[1:] if rng.random() < 0.5 else text


def main(rows_per_intent: int = 80, eval_share: float = 0.2, seed: int = 13) -> None:
    rng = random.Random(seed)
    train, evaluation = [], []
    for intent, templates in TEMPLATES.items():
        seen: set[str] = set()
        while len(seen) < rows_per_intent:
            seen.add(fill(rng.choice(templates), rng))
        rows = [(text, intent) for text in sorted(seen)]
        rng.shuffle(rows)
        cut = round(len(rows) * eval_share)
        evaluation += rows[:cut]
        train += rows[cut:]
    here = Path(__file__).parent
    for name, rows in (("train.csv", train), ("eval.csv", evaluation)):
        rng.shuffle(rows)
        with open(here / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    main()
