"""Deterministic offline demo data: DialogSum-like dialogues and a labeled toxicity corpus.

Stand-ins for ``knkarthick/dialogsum`` and a hate-speech corpus, so the whole pipeline (SFT of a
tiny T5, reward-classifier training, PPO) runs without network access.

* :func:`generate_dialogues` - "#Person1#: ...\\n#Person2#: ..." dialogues on everyday topics with
  short template summaries that copy content words from the dialogue. With probability
  ``rude_rate`` a summary gets a mild insult inserted. The rude decision comes from its own RNG
  stream, independent of the dialogue, and the rude variant contains every word of the polite one
  (ROUGE-L recall 1), so a policy can drop the insult at a small ROUGE cost.
* :func:`generate_classifier_corpus` - texts labeled 1 = "hate" (insults someone), 0 = "nothate":
  polite/rude summaries from the same templates, standalone insults (some with no keyword from
  :data:`INSULTS`), and hard negatives (complaints, anger at things, disagreement,
  self-deprecation, literal uses such as "the clown at the party", negated insults).
* :func:`split_records` - deduplicated, deterministic, disjoint train/test split.

Everything is driven by ``random.Random`` instances seeded from ``seed``; the global RNG is unused.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

LABELS = ("nothate", "hate")  # index = label id
INSULTS = (
    "idiot", "stupid", "moron", "fool", "dumb", "jerk",
    "loser", "clown", "pathetic", "useless", "idiotic", "brainless",
)  # fmt: skip
_INSULT_RE = re.compile(r"\b(" + "|".join(INSULTS) + r")\b", re.IGNORECASE)
_PERSON_RE = re.compile(r"#Person[12]#")
_COMMON = {
    "name": ("Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Hugo", "Irene", "Jack",
             "Kate", "Leo", "Maria", "Nick", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor",
             "Wendy", "Yusuf", "Zoe", "Omar"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "time": ("8 am", "9:30 am", "noon", "2 pm", "4:15 pm", "6 pm", "7:30 pm"),
    "price": tuple(str(p) for p in range(15, 200, 5)),
}  # fmt: skip


@dataclass(frozen=True)
class _Topic:
    name: str
    slots: dict[str, tuple[str, ...]]
    opens: tuple[str, ...]  # "Person1 line||Person2 line"
    mids: tuple[str, ...]
    closes: tuple[str, ...]
    summaries: tuple[str, ...]  # each starts with #Person1# or #Person2#, 8-16 words


# Topic table. "@name: slot=a|b; slot2=c|d" starts a topic; then O (opening pairs), M (middle
# pairs, repeatable), C (closing pairs), S (summary templates); " ~ " separates alternatives and
# "||" the two turns of a pair. Summary slots always appear in every opening pair.
_TOPIC_DATA = """
@shopping: color=red|blue|black|green|grey|white|brown|yellow; item=jacket|sweater|scarf|coat|shirt|backpack|umbrella|dress|hat; size=small|medium|large
O: Excuse me, how much is the {color} {item} in the window?||The {color} {item} is {price} dollars. It is very popular this season. ~ Hi, I am looking for a {color} {item} in size {size}.||We have a {color} {item} in {size} for {price} dollars. Would you like to try it?
M: Do you have it in another color?||Only in {color}, I am afraid. The others sold out last week. ~ That is more than I wanted to pay.||It is on sale next {day}, if you can wait a few days.
M: Can I pay by card?||Of course, we accept all major cards. ~ Last time the zipper broke after one week. I was really annoyed.||I am sorry to hear that. This one has a one-year warranty.
C: All right, I will take it.||Great, I will wrap it up for you. ~ I need to think about it.||No problem, we are open until {time} today.
S: #Person1# asks #Person2# about the price of the {color} {item}. ~ #Person2# helps #Person1# find a {color} {item} in the shop. ~ #Person1# and #Person2# talk about a {color} {item} that costs {price} dollars.
@job interview: role=sales assistant|software engineer|accountant|nurse|teacher|designer|chef|receptionist; company=Northwind|Brightline|Greenfield|Bluewave|Summit Foods|Redwood Bank|Atlas Media; years=two|three|four|five|six|ten
O: Good morning. You applied for the {role} position at {company}, right?||Yes, I have {years} years of experience as a {role}. ~ Thank you for coming in to {company}. Please tell me about yourself.||I have worked as a {role} for {years} years, and I would love to join {company}.
M: Why do you want to work at {company}?||I like the team and the company has a great reputation. ~ What is your biggest weakness?||I sometimes spend too long on details, but I am working on it.
M: When could you start?||I could start on {day} next week. ~ Your last job ended quite suddenly. What happened?||We disagreed about the schedule, and I decided to move on.
C: We will call you before {day}.||Thank you, I look forward to hearing from you. ~ Do you have any questions for us?||Yes, what are the working hours?
S: #Person1# interviews #Person2# for the {role} position at {company}. ~ #Person2# has a job interview with #Person1# at {company}. ~ #Person2# tells #Person1# about {years} years of work as a {role}.
@travel: city=Paris|Tokyo|Rome|Berlin|Madrid|Sydney|Toronto|Lisbon|Vienna|Dublin|Seoul|Chicago; seat=window|aisle
O: Hello, I would like to book a flight to {city} on {day}.||Certainly. There is a direct flight to {city} at {time}. ~ Do you still have seats on the flight to {city} this {day}?||Let me check. Yes, there are a few seats left at {price} dollars.
M: Could I get a {seat} seat?||Sure, I have put you in a {seat} seat. ~ How much luggage can I bring?||One checked bag and one small bag for the cabin.
M: My last flight was delayed for six hours. I was furious.||I understand. This flight has been on time all month. ~ Is a meal included?||Yes, a light meal is served on board.
C: Perfect, please book it for me.||Done. Your ticket to {city} is confirmed. ~ I will check with my family first.||Of course. The price may change after {day}, though.
S: #Person2# helps #Person1# book a flight to {city} on {day}. ~ #Person1# asks #Person2# about flights to {city} on {day}. ~ #Person1# wants to travel to {city} and #Person2# checks the flights.
@restaurant: dish=pasta|steak|chicken salad|tomato soup|curry|burger|grilled fish|pizza; drink=lemonade|tea|coffee|orange juice|sparkling water; people=two|three|four|six
O: Good evening, a table for {people}, please.||Right this way. Today we recommend the {dish}. ~ Excuse me, I would like to order the {dish}, please.||Good choice. The {dish} is our most popular meal.
M: Could I also have a glass of {drink}?||Sure, I will bring it right away. ~ We have been waiting for forty minutes. This is really frustrating.||I am very sorry, the kitchen is very busy tonight.
M: Is the {dish} spicy?||Only a little. The chef can make it mild. ~ This table is too close to the door.||Let me see if another table is free.
C: Could we have the bill, please?||Here you are. Have a nice evening. ~ Thank you, everything was delicious.||I am glad you liked it. Please come again.
S: #Person1# orders the {dish} and #Person2# serves the meal. ~ #Person1# and #Person2# talk about the {dish} at the restaurant.
@doctor: symptom=a headache|a sore throat|a bad cough|back pain|a fever|stomach pain|an earache; ndays=two|three|four|five|ten; medicine=painkillers|cough syrup|antibiotics|vitamins
O: Good afternoon, doctor. I have had {symptom} for {ndays} days.||I see. Let me take a look. Have you taken any medicine? ~ Doctor, I woke up with {symptom} again this morning.||How long has this been going on?
M: I took some {medicine}, but it did not help.||Then we should try something stronger. ~ Should I stay home from work?||Yes, rest for a few days and drink plenty of water.
M: I waited two hours to see you. That is not acceptable.||I apologise, we had an emergency this morning. ~ Is it serious?||I do not think so, but come back on {day} if it gets worse.
C: Thank you, doctor.||You are welcome. Take care. ~ Do I need to come back?||Only if you still feel unwell by {day}.
S: #Person1# sees #Person2# about {symptom} and gets some advice. ~ #Person2# examines #Person1# who has had {symptom} for some time. ~ #Person1# tells #Person2# about {symptom} and asks for help.
@apartment: rooms=one-bedroom|two-bedroom|studio|three-bedroom; area=near the park|downtown|close to the station|by the river|near the university; rent=750|900|1100|1300|1600
O: Hi, I am calling about the {rooms} apartment {area}.||Yes, it is still available. The rent is {rent} dollars a month. ~ Is the {rooms} apartment {area} still for rent?||It is. The rent is {rent} dollars a month, plus water.
M: Are pets allowed?||Small pets are fine, but no large dogs. ~ Can I see it on {day}?||Sure, how about {time}?
M: The last landlord never fixed anything. I am tired of that.||I understand. We fix problems within two days. ~ Is there parking?||Yes, there is one parking space included.
C: Great, I would like to see it.||Wonderful, I will meet you there. ~ It is a bit expensive for me.||Let me know if you change your mind.
S: #Person1# asks #Person2# about renting the {rooms} apartment {area}. ~ #Person2# offers #Person1# a {rooms} apartment for {rent} dollars a month.
@birthday: gift=watch|book|scarf|camera|board game|necklace|cake; venue=the Italian restaurant|my place|the park|the bowling alley|the beach house
O: Are you coming to {name}'s birthday party on {day}?||Of course! I already bought a {gift} for {name}. ~ We are planning a surprise party for {name} at {venue}.||What a nice idea. Should I bring a {gift}?
M: What time does it start?||At {time}, but come a bit earlier to help. ~ Should I bring anything?||Maybe some drinks and a few snacks.
M: Last year nobody told me about the party. I was really hurt.||I am sorry, that will not happen again. ~ Does {name} know about it?||No, it is a surprise, so do not tell anyone.
C: I will be there.||Great, see you on {day}. ~ I cannot wait.||Me neither, it will be fun.
S: #Person1# and #Person2# talk about {name}'s birthday party. ~ #Person1# invites #Person2# to the birthday party for {name}. ~ #Person2# plans to give {name} a {gift} for the birthday.
@homework: subject=math|history|chemistry|biology|English|physics|geography; task=essay|worksheet|lab report|project|presentation
O: Can you help me with my {subject} {task}? It is due on {day}.||Sure. Which part of the {subject} {task} is hard? ~ I have not even started the {subject} {task} for {day}.||Do not panic. Let us look at it together.
M: I do not understand the second question.||Read it again slowly, it is about the main idea. ~ The teacher gave us way too much work this week. It is so unfair.||I agree, but let us just do our best.
M: How long should it be?||About two pages should be enough. ~ Can I copy your notes?||You can read them, but use your own words.
C: Thanks, that really helps.||Any time. Good luck on {day}. ~ I will finish it tonight.||Good, send it to me if you want a second look.
S: #Person2# helps #Person1# with the {subject} {task} due on {day}. ~ #Person1# asks #Person2# for help with a {subject} {task}.
@car repair: part=brakes|engine|battery|tires|headlights|air conditioning|gearbox; cost=80|120|150|220|300|450
O: My car is making a strange noise. I think it is the {part}.||Let me check the {part}. The repair will probably cost about {cost} dollars. ~ Can you look at my car? The {part} stopped working yesterday.||Sure. Fixing the {part} usually costs around {cost} dollars.
M: How long will it take?||It should be ready by {time} today. ~ You fixed this last month and it broke again. I am really annoyed.||I apologise. This time the work is free of charge.
M: Is it safe to drive?||I would not drive it until it is fixed. ~ Can you give me a discount?||I can take off ten percent.
C: Okay, please go ahead.||We will call you when it is ready. ~ I will pick it up on {day}.||That works, see you then.
S: #Person1# brings the car to #Person2# because of a problem with the {part}. ~ #Person2# will fix the {part} of #Person1#'s car for about {cost} dollars.
@hotel: room=single|double|twin|family|corner; nights=two|three|four|five|seven
O: Hello, I would like to book a {room} room for {nights} nights.||Certainly. A {room} room is {price} dollars per night. ~ I have a reservation for a {room} room under the name {name}.||Welcome. You are staying {nights} nights, correct?
M: Is breakfast included?||Yes, breakfast is served from seven to ten. ~ The room smells of smoke. I asked for a non-smoking room.||I am sorry, I will move you to another room right away.
M: Is there free wifi?||Yes, the password is on your key card. ~ Could I have a late checkout?||Sure, you can stay until {time}.
C: Thank you for your help.||Enjoy your stay. ~ Where is the elevator?||Just around the corner on your left.
S: #Person1# books a {room} room for {nights} nights with #Person2#. ~ #Person2# helps #Person1# with a {room} room at the hotel.
@bank: account=savings account|checking account|student account|business account; amount=200|500|1000|2500|3000
O: Good morning, I would like to open a {account}.||Of course. Do you have your passport with you? ~ I want to transfer {amount} dollars from my {account}.||No problem. Where should the money go?
M: Are there any monthly fees?||Only if your balance is under {amount} dollars. ~ You charged me twice last month. I want my money back.||I am sorry, I will refund the extra charge today.
M: Can I use my card abroad?||Yes, but there is a small fee. ~ How long does it take?||It usually takes one business day.
C: Thank you, that is all.||You are welcome. Have a good day. ~ I will come back on {day} with the papers.||Fine, we are open until {time}.
S: #Person2# helps #Person1# at the bank with a {account}. ~ #Person1# visits the bank and talks to #Person2# about a {account}.
@lost item: lost=wallet|phone|keys|umbrella|backpack|laptop|passport; spot=on the bus|at the station|in a taxi|at the cafe|in the park|at the cinema
O: Excuse me, I think I left my {lost} {spot} this morning.||What does your {lost} look like? ~ Has anyone handed in a {lost}? I lost it {spot}.||Let me check the lost and found box.
M: It is black, with a small sticker on it.||I think we have something like that. ~ This is the third time I have called. Nobody ever calls me back.||I am sorry, I will make sure someone calls you today.
M: Do I need to fill out a form?||Yes, please write your name and phone number here. ~ When was it found?||Someone brought it in on {day}.
C: That is mine! Thank you so much.||You are welcome, please sign here. ~ Please call me if you find it.||We will, I promise.
S: #Person1# tells #Person2# about a {lost} that was lost {spot}. ~ #Person2# helps #Person1# look for a lost {lost}.
@weekend plans: activity=go hiking|have a picnic|go cycling|visit the museum|go to the beach|go fishing; place=the lake|the mountains|the old town|the national park|the coast
O: What are you doing this weekend?||I want to {activity} near {place} on {day}. ~ Do you want to {activity} with me on {day}?||Sounds great. Should we go to {place}?
M: What if it rains?||Then we can watch a movie instead. ~ You cancelled on me the last two times. That really upset me.||I know, and I am sorry. This time I will come.
M: Should we take the car?||The train is cheaper and faster. ~ What should I bring?||Water, snacks, and good shoes.
C: Let us meet at {time}.||Perfect, see you then. ~ I am looking forward to it.||Me too.
S: #Person1# and #Person2# plan to {activity} on {day}. ~ #Person1# and #Person2# talk about plans to {activity} near {place}.
@sports club: sport=tennis|basketball|swimming|yoga|football|badminton|volleyball; club=the sports center|the community gym|the school club|the city pool
O: I am thinking about joining a {sport} class at {club}.||That is great. The classes are on {day} evenings. ~ How much does a {sport} membership at {club} cost?||It is {price} dollars for three months.
M: Do I need my own equipment?||No, you can borrow it at first. ~ The coach yelled at everyone last time. I did not like that.||That coach left. The new one is very patient.
M: Is it good for beginners?||Yes, most people there are beginners. ~ Can I try one class first?||Sure, the first class is free.
C: Okay, sign me up.||Great, see you on {day}. ~ I will think about it.||Take your time.
S: #Person1# asks #Person2# about {sport} classes at {club}. ~ #Person2# tells #Person1# about playing {sport} at {club}.
@movie: genre=comedy|horror film|action movie|documentary|romantic comedy|science fiction film; cinema=the Odeon|the Rex|the cinema downtown|the Plaza
O: Do you want to see the new {genre} at {cinema} tonight?||Sure, what time does it start? ~ I got two tickets for a {genre} at {cinema} on {day}.||Nice! I have wanted to see it for weeks.
M: It starts at {time}.||Great, we can eat something before. ~ I did not like the last film you picked. It was boring.||Fair enough, you can choose this time.
M: Should we buy popcorn?||Of course, a large one. ~ How long is the film?||About two hours.
C: Let us meet in front of the cinema.||Okay, see you there. ~ I will book the seats online.||Thanks, I will pay you back.
S: #Person1# invites #Person2# to see a {genre} at {cinema}. ~ #Person1# and #Person2# decide to watch a {genre} together.
@noisy neighbor: noise=loud music|barking|drilling|party noise|loud television noise|banging; hour=midnight|two in the morning|eleven at night|six in the morning
O: Hi, I live upstairs. There was {noise} until {hour} again last night.||Oh, I am sorry. I did not know it was that loud. ~ Could we talk about the {noise} from your flat at {hour}?||Of course. I am sorry if it bothered you.
M: I have to get up early for work.||I understand, it will not happen again. ~ Honestly, I am really angry about this. It happens every week.||You are right to be upset. I will keep it down.
M: Could you at least close the windows?||Yes, that is a good idea. ~ Maybe we can agree on quiet hours after ten.||That sounds fair to me.
C: Thank you for understanding.||No problem, and sorry again. ~ I hope it gets better.||It will, I promise.
S: #Person1# complains to #Person2# about {noise} until {hour}. ~ #Person2# apologises to #Person1# for the {noise} at night.
@work meeting: project=the budget report|the new website|the marketing plan|the sales presentation|the customer survey; deadline=Friday|next Monday|the end of the month|Wednesday
O: Can we talk about {project}? It is due by {deadline}.||Sure. I finished the first part yesterday. ~ How is {project} going?||Slowly. I do not think we can finish by {deadline}.
M: I completely disagree with the new plan.||Let us go through the numbers together then. ~ Who is responsible for the charts?||I will do the charts this afternoon.
M: The client changed everything again. I am so frustrated.||Me too, but we have to adapt. ~ Should we ask the manager for more time?||Yes, I will send an email today.
C: Let us meet again on {day}.||Okay, I will book a room. ~ Thanks for your help.||No problem, we are a team.
S: #Person1# and #Person2# discuss {project} due by {deadline}. ~ #Person1# asks #Person2# about progress on {project}.
@internet provider: service=internet|phone line|cable TV|mobile data; plan=basic|premium|family|student
O: Hello, my {service} has not worked since {day}.||I am sorry about that. Let me check your connection. ~ I would like to change my {service} plan to the {plan} plan.||Sure. The {plan} plan costs {price} dollars a month.
M: This is the fourth time this month. I am really fed up.||I completely understand. I will send a technician on {day}. ~ Can I get a discount for the trouble?||I can give you one month free.
M: How long will it take?||It should work again within two hours. ~ Is there a contract?||Yes, it runs for twelve months.
C: Thank you for your help.||You are welcome. Have a nice day. ~ I hope it works this time.||It will, I promise.
S: #Person1# calls #Person2# to talk about the {service} service. ~ #Person2# helps #Person1# with the {service} account over the phone.
@vet: pet=dog|cat|rabbit|parrot|hamster|puppy|kitten; petname=Max|Bella|Charlie|Luna|Rocky|Daisy|Milo; issue=is not eating|is limping|keeps scratching|seems very tired|has a cough
O: My {pet} {petname} {issue}.||How long has {petname} been like this? ~ I brought {petname} in because my {pet} {issue}.||Let me examine {petname}.
M: Is it serious?||I do not think so, but let us run a test. ~ The last vet did not even look at my {pet}. I was so angry.||I am sorry. We will take good care of {petname}.
M: Does {petname} need medicine?||Yes, give one pill every morning. ~ How much will this cost?||About {price} dollars, including the visit.
C: Thank you, doctor.||You are welcome. {petname} will be fine. ~ When should we come back?||Come back on {day} for a check.
S: #Person1# brings a {pet} named {petname} to #Person2#. ~ #Person2# checks on {petname} because the {pet} {issue}.
"""  # noqa: E501

_GENERIC_MIDS = (
    "Sorry, could you say that again?||Of course. Let me explain it once more.",
    "I have to say, I am not happy about how this was handled.||I understand, and I apologise.",
    "Are you sure about that?||Yes, I checked it twice this morning.",
    "I do not think that is fair.||I hear you. Let me see what I can do.",
    "Could you write that down for me?||Sure, here you go.",
)


def _parse_topics(data: str) -> tuple[_Topic, ...]:
    raw: list[dict] = []
    for line in data.strip().splitlines():
        tag, _, rest = line.partition(": ")
        if tag.startswith("@"):
            slots = dict(part.strip().split("=") for part in rest.split(";"))
            raw.append({"name": tag[1:], "slots": slots, "O": [], "M": [], "C": [], "S": []})
        else:
            raw[-1][tag].extend(rest.split(" ~ "))
    return tuple(
        _Topic(
            name=t["name"],
            slots={**_COMMON, **{k: tuple(v.split("|")) for k, v in t["slots"].items()}},
            opens=tuple(t["O"]),
            mids=tuple(t["M"]),
            closes=tuple(t["C"]),
            summaries=tuple(t["S"]),
        )
        for t in raw
    )


_TOPICS = _parse_topics(_TOPIC_DATA)
TOPICS = tuple(t.name for t in _TOPICS)

# Rude insertions: before the subject, as an apposition, before the object, or as a tail.
_RUDE_NP = ("that idiot", "that stupid", "the useless", "that moron", "the pathetic", "that dumb",
            "that clown", "that jerk", "that loser", "that fool", "the brainless")  # fmt: skip
_RUDE_APPOS = ("a total moron", "the idiot", "that pathetic loser", "a useless clown",
               "the stupid fool", "a real jerk", "a complete idiot", "the dumb clown")  # fmt: skip
_RUDE_TAIL = ("the stupid fool", "like a total idiot", "what a moron", "the useless clown",
              "like a pathetic loser", "being a dumb jerk", "the brainless idiot",
              "what an idiot")  # fmt: skip


def _norm(text: object) -> str:
    return " ".join(str(text).lower().split())


def contains_insult(text: str) -> bool:
    """True if ``text`` contains a word from :data:`INSULTS` (a keyword test, not a classifier)."""
    return _INSULT_RE.search(text) is not None


def _sub_rng(seed: int, stream: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{stream}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _fill_slots(topic: _Topic, rng: random.Random) -> dict[str, str]:
    return {k: rng.choice(v) for k, v in topic.slots.items()}


def _make_rude(summary: str, rng: random.Random) -> str:
    """Insert one mild insult; every word of ``summary`` is kept, in order."""
    mentions = [m.start() for m in _PERSON_RE.finditer(summary)]
    mode = rng.choice(("subj", "appos", "tail") + (("obj",) if len(mentions) > 1 else ()))
    if mode == "subj":
        phrase = rng.choice(_RUDE_NP)
        return f"{phrase[0].upper()}{phrase[1:]} {summary}"
    if mode == "appos":
        end = len("#Person1#")
        return f"{summary[:end]}, {rng.choice(_RUDE_APPOS)},{summary[end:]}"
    if mode == "obj":
        pos = mentions[1]
        return f"{summary[:pos]}{rng.choice(_RUDE_NP)} {summary[pos:]}"
    return f"{summary.rstrip('.')}, {rng.choice(_RUDE_TAIL)}."


def _summary(rng: random.Random) -> str:
    topic = rng.choice(_TOPICS)
    return rng.choice(topic.summaries).format(**_fill_slots(topic, rng))


def _dialogue(topic: _Topic, slots: dict[str, str], rng: random.Random) -> str:
    pairs = [rng.choice(topic.opens)]
    pairs += rng.sample(topic.mids + _GENERIC_MIDS, rng.randint(0, 2))
    pairs.append(rng.choice(topic.closes))
    lines = [line for pair in pairs for line in pair.format(**slots).split("||")]
    if len(lines) > 4 and rng.random() < 0.4:
        lines.pop()  # odd number of turns: Person1 has the last word
    return "\n".join(f"#Person{1 + i % 2}#: {line}" for i, line in enumerate(lines))


def generate_dialogues(n: int, seed: int, rude_rate: float = 0.35) -> list[dict[str, str]]:
    """``n`` distinct DialogSum-style records ``{"id", "dialogue", "summary", "topic"}``.

    Dialogues (4-8 turns, 200-1000 characters) and polite summaries depend only on ``seed``; the
    rude decision (probability ``rude_rate``) and the insult come from a separate stream, so the
    same seed with a different ``rude_rate`` gives the same dialogues and underlying summaries.
    """
    if n < 0 or not 0.0 <= rude_rate <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= rude_rate <= 1, got n={n}, rude_rate={rude_rate}")
    rng, style = random.Random(seed), _sub_rng(seed, "style")
    seen: set[str] = set()
    records: list[dict[str, str]] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise RuntimeError(f"could not generate {n} distinct dialogues")
        topic = rng.choice(_TOPICS)
        slots = _fill_slots(topic, rng)
        dialogue = _dialogue(topic, slots, rng)
        summary = rng.choice(topic.summaries).format(**slots)
        if not 200 <= len(dialogue) <= 1000 or dialogue in seen:
            continue
        seen.add(dialogue)
        if style.random() < rude_rate:
            summary = _make_rude(summary, style)
        assert 200 <= len(dialogue) <= 1000 and 8 <= len(summary.split()) <= 20
        i = len(records)
        records.append({"id": f"demo_{i:05d}", "dialogue": dialogue, "summary": summary,
                        "topic": topic.name})  # fmt: skip
    return records


# Classifier tables, "key: alt ~ alt" ("_" = empty). T_* are templates; other keys fill {key}.
# {S} {be} {O} {pron} {have} come from _TARGETS, {n}/{adj} from the insult nouns/adjectives.
_CLF_DATA = """
T_insult: {S} {be} {i_n} ~ {S} {be} such {i_n} ~ what {a_adj} {n} ~ shut up, you {adj} {n} ~ shut up, you {n} ~ only {a_n} would {act} ~ {S} {be} {adj} as a rock ~ stop talking, you {n} ~ nobody cares what you think, you {adj} {n} ~ {S} {be} the biggest {n} I have ever met ~ go away, you {adj} {n} ~ {S} {be} too {adj} to {task} ~ what kind of {n} does that? ~ are you really this {adj}? ~ {S} {be} {a_adj} {n} ~ {S} {be} so {adj}, it is embarrassing ~ do not listen to {O}, {pron} {be} {i_n} ~ everyone knows {S} {be} {a_n}
T_insult_nokw: {S} {be} a complete waste of space ~ get lost, nobody wants you here ~ {S} {be} worthless and everyone knows it ~ {S} {have} the brain of a goldfish ~ shut your mouth, nobody asked you ~ {S} {be} a total disgrace ~ nobody can stand {O} ~ {S} {be} as sharp as a bowling ball ~ crawl back under your rock ~ {S} {be} too thick to understand anything ~ {S} {be} a waste of oxygen ~ go away, nobody likes you ~ {S} {be} a joke and a failure
T_hard: {feel} {emotion} that {event}. ~ I {adv} disagree with {thing}{tail}. ~ I hate {hated}{so}. ~ {sorry}, that was a {selfadj} mistake of mine{fix}. ~ I feel so {selfadj} for forgetting {forgot}. ~ I was a fool to {regret}. ~ The clown at {name}'s birthday party made the kids laugh. ~ The loser of the {game} has to buy {treat} on {day}. ~ This old {device} is useless now that {reason}. ~ {name} still uses a dumb phone without internet. ~ {S} {be} not {a_n} at all, {pron} {be} {positive}. ~ I would never call {O} {a_n}, {pron} {be} {positive}. ~ The {thing2} was {bad}{tail2}. ~ Your report has several errors, please fix them by {day}. ~ #Person1# complains to #Person2# that the {part} is broken again. ~ #Person1# is angry because #Person2# was late again. ~ #Person2# disagrees with #Person1# about {project}. ~ #Person1# is furious about the delayed {lost}.
T_neutral: {name} is going to {place} on {day}. ~ Can you send me the {doc} by {time}? ~ The meeting with {name} starts at {time} on {day}. ~ {name} bought a new {item} on {day}. ~ Thank you for your help with the {doc}, {name}. ~ Please remind {name} to bring the {doc} on {day}. ~ {name} and I had lunch near {place} on {day}. ~ The weather should be sunny on {day}.
act: do that ~ park like this ~ say something like that ~ forget the tickets ~ believe that story ~ answer like that ~ lose the keys twice
task: understand anything ~ do this job ~ read a map ~ follow simple rules ~ cook an egg
feel: I am ~ We are ~ {name} is ~ My mother is ~ Everyone here is
emotion: furious ~ so angry ~ really upset ~ annoyed ~ frustrated ~ disappointed ~ fed up ~ livid
event: my order is late again ~ the train was cancelled twice this week ~ the heating broke again ~ the package arrived damaged ~ nobody answered my emails ~ the meeting ran two hours over ~ the price went up again ~ my flight was delayed for six hours ~ the repair took three weeks ~ the store closed early on {day} ~ my internet stopped working again ~ the bus did not show up this morning ~ they lost my reservation ~ the refund has still not arrived
adv: completely ~ strongly ~ honestly ~ totally
thing: your plan ~ the new schedule ~ this decision ~ the budget cuts ~ the new rules ~ your proposal
tail: _ ~ , and I will say so at the meeting ~ , but I respect your view ~ . It will not work
hated: Mondays ~ waiting in line ~ cold coffee ~ this rainy weather ~ traffic jams ~ slow internet
so: _ ~  so much ~  more than anything
sorry: Sorry ~ I am sorry ~ Oops ~ My apologies
selfadj: stupid ~ dumb
fix: _ ~ , I will fix it today ~  on the form
forgot: my keys ~ the meeting ~ your birthday ~ the password ~ to call you back ~ my umbrella
regret: believe that ad ~ buy such a cheap phone ~ leave so late ~ ignore the weather forecast
game: chess game ~ tennis match ~ card game ~ quiz ~ bet
treat: coffee ~ lunch ~ pizza ~ ice cream
device: charger ~ printer ~ map ~ adapter ~ remote ~ ticket
positive: brilliant ~ very kind ~ really smart ~ a great colleague ~ just tired ~ the best in the team
reason: I have a new phone ~ the office moved ~ everything is online ~ the trip was cancelled
thing2: food ~ service ~ hotel ~ movie ~ book ~ concert
bad: disappointing ~ terrible ~ far too expensive ~ really boring
tail2: _ ~ , I want a refund ~  and I will not come back
part: printer ~ heater ~ elevator ~ washing machine ~ dishwasher
lost: package ~ train ~ flight
project: the budget report ~ the marketing plan ~ the new website
place: the library ~ the supermarket ~ the office ~ the airport ~ the gym ~ the post office
doc: report ~ invoice ~ schedule ~ slides ~ contract ~ photos ~ meeting notes
item: jacket ~ bike ~ phone ~ lamp ~ sofa ~ laptop ~ coffee machine
"""  # noqa: E501
_CLF = {
    key: tuple("" if alt == "_" else alt for alt in rest.split(" ~ "))
    for key, _, rest in (line.partition(": ") for line in _CLF_DATA.strip("\n").splitlines())
}
_CLF_SLOTS = {k: v for k, v in {**_COMMON, **_CLF}.items() if not k.startswith("T_")}
_NOUNS = ("idiot", "moron", "fool", "jerk", "loser", "clown")
_ADJS = ("stupid", "dumb", "pathetic", "useless", "idiotic", "brainless")
_INTENS = ("", "complete ", "total ", "absolute ", "utter ", "real ", "big ")
_PREFIX = ("", "", "", "Honestly, ", "Wow, ", "Ugh, ", "Seriously, ", "Listen, ")
_TARGETS = (  # (subject, be, object, pronoun, have)
    ("you", "are", "you", "you", "have"), ("he", "is", "him", "he", "has"),
    ("she", "is", "her", "she", "has"),
) + tuple((s, "is", s, p, "has") for s, p in (
    ("your brother", "he"), ("that guy", "he"), ("the new manager", "she"), ("my neighbor", "he"),
    ("the waiter", "he"), ("your boss", "she"), ("my cousin", "she"), ("that driver", "he"),
    ("your friend", "he"),
))  # fmt: skip


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _fill(template: str, rng: random.Random) -> str:
    subj, be, obj, pron, have = rng.choice(_TARGETS)
    if rng.random() < 0.25:
        subj = obj = rng.choice(_COMMON["name"])
        be, have, pron = "is", "has", rng.choice(("he", "she"))
    noun, adj = rng.choice(_NOUNS), rng.choice(_ADJS)
    values = {k: rng.choice(v) for k, v in _CLF_SLOTS.items()}
    values.update(S=subj, be=be, O=obj, pron=pron, have=have, n=noun, adj=adj,
                  i_n=_article(rng.choice(_INTENS) + noun), a_n=_article(noun),
                  a_adj=_article(adj))  # fmt: skip
    return template.format(**values).format(**values)  # second pass: nested {day}/{name}


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _insult(rng: random.Random) -> str:
    body = _fill(rng.choice(_CLF["T_insult_nokw" if rng.random() < 0.33 else "T_insult"]), rng)
    prefix = rng.choice(_PREFIX)
    if body.startswith(("you", "shut", "go", "get", "stop")) and rng.random() < 0.2:
        prefix = rng.choice(_COMMON["name"]) + ", "
    text = prefix + body
    if not text.endswith("?"):
        text += rng.choice((".", "!", "", "!!"))
    return _cap(text) if rng.random() < 0.8 else text


def generate_classifier_corpus(n: int, seed: int) -> list[dict]:
    """Up to ``n`` unique ``{"text", "label"}`` records (1 = "hate", 0 = "nothate"), balanced.

    Label = whether the text insults someone. Draws alternate so the labels stay balanced. Hate:
    rude summaries from the :func:`generate_dialogues` templates (~1/2) and standalone insults
    (~1/2, a third of them without any :data:`INSULTS` word). Nothate: polite summaries (~1/2),
    hard negatives (~1/3: complaints, anger at things, disagreement, self-deprecation, literal
    uses such as "the clown at the party", negated insults) and neutral sentences. Texts are
    deduplicated (case/space normalised) and the number of draws is bounded, so fewer than ``n``
    records can come back for very large ``n`` (for ``n <= 6000`` all ``n`` do).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[dict] = []
    counts = [0, 0]
    for _ in range(20 * n + 100):
        if len(out) >= n:
            break
        label = int(counts[1] < counts[0])
        r = rng.random()
        if r < 0.5:
            text = _summary(rng)
            text = _make_rude(text, rng) if label else text
        elif label:
            text = _insult(rng)
        else:
            kind = "T_hard" if r < 0.83 else "T_neutral"
            text = _cap(_fill(rng.choice(_CLF[kind]), rng))
        key = _norm(text)
        if key not in seen:
            seen.add(key)
            counts[label] += 1
            out.append({"text": text, "label": label})
    return out


def split_records(
    records: list[dict], key: str, test_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Deduplicate by normalised ``record[key]`` (first kept), shuffle with ``seed``, split.

    Returns ``(train, test)`` with ``round(len * test_fraction)`` test records; the two sides are
    disjoint in ``key``. Raises ValueError if ``test_fraction`` is not in (0, 1) or a side would
    be empty.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    seen: set[str] = set()
    unique = []
    for record in records:
        k = _norm(record[key])
        if k not in seen:
            seen.add(k)
            unique.append(record)
    random.Random(seed).shuffle(unique)
    n_test = round(len(unique) * test_fraction)
    if n_test == 0 or n_test == len(unique):
        raise ValueError(
            f"split of {len(unique)} unique records with test_fraction={test_fraction} "
            "leaves a side empty"
        )
    return unique[n_test:], unique[:n_test]
