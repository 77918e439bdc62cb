"""The demo dialogues' topics: per topic, its slots and its opening, middle and closing turn
pairs and summary templates (:func:`detox_exp.demo.corpus.generate_dialogues` draws from
them), parsed from one compact table."""

from __future__ import annotations

from dataclasses import dataclass

COMMON_SLOTS = {
    "name": ("Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Hugo", "Irene", "Jack",
             "Kate", "Leo", "Maria", "Nick", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor",
             "Wendy", "Yusuf", "Zoe", "Omar"),
    "day": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "time": ("8 am", "9:30 am", "noon", "2 pm", "4:15 pm", "6 pm", "7:30 pm"),
    "price": tuple(str(p) for p in range(15, 200, 5)),
}  # fmt: skip


@dataclass(frozen=True)
class Topic:
    name: str
    slots: dict[str, tuple[str, ...]]
    opens: tuple[str, ...]  # "Person1 line||Person2 line"
    mids: tuple[str, ...]
    closes: tuple[str, ...]
    summaries: tuple[str, ...]  # each starts with #Person1# or #Person2#, 8-16 words


# Topic table. "@name: slot=a|b; slot2=c|d" starts a topic; then O (opening pairs), M (middle
# pairs, repeatable), C (closing pairs), S (summary templates); " ~ " separates alternatives and
# "||" the two turns of a pair. Summary slots always appear in every opening pair.
_TABLE = """
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

GENERIC_MIDS = (
    "Sorry, could you say that again?||Of course. Let me explain it once more.",
    "I have to say, I am not happy about how this was handled.||I understand, and I apologise.",
    "Are you sure about that?||Yes, I checked it twice this morning.",
    "I do not think that is fair.||I hear you. Let me see what I can do.",
    "Could you write that down for me?||Sure, here you go.",
)


def _parse(data: str) -> tuple[Topic, ...]:
    raw: list[dict] = []
    for line in data.strip().splitlines():
        tag, _, rest = line.partition(": ")
        if tag.startswith("@"):
            slots = dict(part.strip().split("=") for part in rest.split(";"))
            raw.append({"name": tag[1:], "slots": slots, "O": [], "M": [], "C": [], "S": []})
        else:
            raw[-1][tag].extend(rest.split(" ~ "))
    return tuple(
        Topic(
            name=t["name"],
            slots={**COMMON_SLOTS, **{k: tuple(v.split("|")) for k, v in t["slots"].items()}},
            opens=tuple(t["O"]),
            mids=tuple(t["M"]),
            closes=tuple(t["C"]),
            summaries=tuple(t["S"]),
        )
        for t in raw
    )


TOPIC_TABLE = _parse(_TABLE)
TOPICS = tuple(t.name for t in TOPIC_TABLE)
