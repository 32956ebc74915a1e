"""Generate the tiny bundled example data sets for nanobumble.

Run from the repository root:

    python datasets/generate.py

Standard library only. Every file is produced from fixed random seeds, so
running the script again rewrites all outputs byte-identically.
"""

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------------------
# Shared vocabulary
# ---------------------------------------------------------------------------

# (name, plural, class, habitat, food, trait, fact, symbol, wild)
ANIMALS_EN = [
    ("fox", "foxes", "mammal", "forests, fields and the edges of towns",
     "mice, rabbits, berries and insects", "its bushy tail and pointed ears",
     "can hear a mouse moving under a layer of snow", "cleverness", True),
    ("rabbit", "rabbits", "mammal", "meadows and grassy fields",
     "grass, clover and leafy plants", "its long ears and strong back legs",
     "has front teeth that never stop growing, so it must chew a lot", "quickness", True),
    ("owl", "owls", "bird", "woods, old barns and quiet parks",
     "mice, voles and large insects", "its big forward-facing eyes",
     "hunts at night and flies almost without a sound", "wisdom", True),
    ("dolphin", "dolphins", "mammal", "warm and temperate seas",
     "fish and squid", "its curved fin and playful leaps",
     "breathes air through a blowhole on top of its head", "friendship", True),
    ("elephant", "elephants", "mammal", "the grasslands and forests of Africa and Asia",
     "grass, leaves, bark and fruit", "its long trunk and large ears",
     "uses its trunk to drink, to smell and to pick things up", "memory", True),
    ("penguin", "penguins", "bird", "cold southern coasts and islands",
     "fish, krill and squid", "its black and white feathers",
     "cannot fly but swims very fast under water", "teamwork", True),
    ("camel", "camels", "mammal", "hot, dry deserts",
     "dry plants and thorny shrubs", "the one or two humps on its back",
     "stores fat, not water, in its hump", "patience", True),
    ("honeybee", "honeybees", "insect", "hives in gardens and meadows",
     "nectar and pollen from flowers", "its striped, fuzzy body",
     "does a little dance to tell other bees where flowers are", "hard work", True),
    ("frog", "frogs", "amphibian", "ponds, streams and wet meadows",
     "insects, worms and snails", "its smooth wet skin and long back legs",
     "starts its life as a tadpole swimming in water", "change", True),
    ("squirrel", "squirrels", "mammal", "parks and woodland",
     "nuts, seeds and fruit", "its fluffy tail",
     "buries nuts in autumn and digs many of them up again in winter", "planning ahead", True),
    ("horse", "horses", "mammal", "farms and open grassland",
     "grass, hay and oats", "its long legs and flowing mane",
     "can rest standing up by locking its legs", "freedom", False),
    ("turtle", "turtles", "reptile", "rivers, lakes and seas",
     "plants, insects and small fish", "its hard, rounded shell",
     "can live for more than fifty years", "long life", True),
    ("eagle", "eagles", "bird", "mountains and cliffs near open land",
     "fish, rabbits and other small animals", "its hooked beak and sharp eyes",
     "can spot a rabbit from high up in the sky", "courage", True),
    ("blue whale", "blue whales", "mammal", "the open ocean",
     "tiny shrimp-like animals called krill", "its enormous size",
     "is the largest animal known to have ever lived", "greatness", True),
    ("cat", "cats", "mammal", "homes all over the world",
     "meat and fish", "its soft paws and long whiskers",
     "uses its whiskers to feel whether it can fit through a gap", "independence", False),
    ("dog", "dogs", "mammal", "homes and farms all over the world",
     "meat, grains and vegetables", "its wagging tail and keen nose",
     "can smell things that people cannot notice at all", "loyalty", False),
    ("panda", "pandas", "mammal", "the bamboo forests in the mountains of China",
     "bamboo shoots and leaves", "its black and white fur",
     "spends more than half of the day eating", "peace", True),
    ("crow", "crows", "bird", "towns, farms and woods",
     "seeds, insects and food scraps", "its glossy black feathers",
     "is clever enough to solve simple puzzles", "cleverness", True),
    ("snail", "snails", "mollusc", "gardens and other damp places",
     "leaves and soft plants", "the spiral shell on its back",
     "glides along on a thin layer of slime", "slowness and care", True),
    ("butterfly", "butterflies", "insect", "gardens and meadows",
     "nectar from flowers", "its bright, colourful wings",
     "begins its life as a caterpillar", "change", True),
]

# (name, class, habitat, food, trait, fact, symbol, wild)
ANIMALS_ZH = [
    ("狐狸", "哺乳动物", "森林、田野和小镇边缘", "老鼠、野兔、浆果和昆虫", "蓬松的尾巴和尖尖的耳朵",
     "能听见雪下面老鼠活动的声音", "聪明", True),
    ("兔子", "哺乳动物", "草地和田野", "青草、三叶草和嫩叶", "长长的耳朵和有力的后腿",
     "门牙会一直生长，所以需要经常啃东西", "敏捷", True),
    ("猫头鹰", "鸟类", "树林、旧谷仓和安静的公园", "老鼠、田鼠和大个的昆虫", "一双朝前看的大眼睛",
     "在夜里捕猎，飞行时几乎没有声音", "智慧", True),
    ("海豚", "哺乳动物", "温暖的海洋", "鱼和鱿鱼", "弯弯的背鳍和欢快的跳跃",
     "通过头顶上的呼吸孔呼吸空气", "友谊", True),
    ("大象", "哺乳动物", "非洲和亚洲的草原与森林", "青草、树叶、树皮和果实", "长长的鼻子和宽大的耳朵",
     "用鼻子喝水、闻气味，还能捡起东西", "记忆", True),
    ("企鹅", "鸟类", "寒冷的南方海岸和岛屿", "鱼、磷虾和鱿鱼", "黑白相间的羽毛",
     "不会飞，但在水里游得非常快", "团结", True),
    ("骆驼", "哺乳动物", "炎热干燥的沙漠", "干草和带刺的灌木", "背上的一个或两个驼峰",
     "驼峰里储存的是脂肪，而不是水", "耐心", True),
    ("蜜蜂", "昆虫", "花园和草地旁的蜂巢", "花蜜和花粉", "毛茸茸的条纹身体",
     "会跳一种舞，告诉同伴花在哪里", "勤劳", True),
    ("青蛙", "两栖动物", "池塘、小溪和潮湿的草地", "昆虫、蚯蚓和蜗牛", "光滑湿润的皮肤和长长的后腿",
     "小时候是在水里游泳的蝌蚪", "变化", True),
    ("松鼠", "哺乳动物", "公园和树林", "坚果、种子和水果", "毛茸茸的大尾巴",
     "秋天把坚果埋起来，冬天再挖出来吃", "未雨绸缪", True),
    ("马", "哺乳动物", "农场和开阔的草原", "青草、干草和燕麦", "修长的腿和飘逸的鬃毛",
     "可以站着休息", "自由", False),
    ("乌龟", "爬行动物", "河流、湖泊和海洋", "水草、昆虫和小鱼", "坚硬的圆形外壳",
     "有的能活五十年以上", "长寿", True),
    ("老鹰", "鸟类", "山地和悬崖附近的开阔地带", "鱼、野兔和其他小动物", "弯钩形的嘴和锐利的眼睛",
     "能从高空看到地上的兔子", "勇敢", True),
    ("蓝鲸", "哺乳动物", "辽阔的海洋", "一种叫磷虾的小动物", "巨大的身体",
     "是已知有史以来最大的动物", "伟大", True),
    ("猫", "哺乳动物", "世界各地的家庭", "肉和鱼", "柔软的脚掌和长长的胡须",
     "会用胡须判断自己能不能钻过一个缝隙", "独立", False),
    ("狗", "哺乳动物", "世界各地的家庭和农场", "肉、谷物和蔬菜", "摇来摇去的尾巴和灵敏的鼻子",
     "能闻到人完全察觉不到的气味", "忠诚", False),
    ("大熊猫", "哺乳动物", "中国山区的竹林", "竹笋和竹叶", "黑白相间的毛",
     "一天中有一大半时间都在吃东西", "和平", True),
    ("乌鸦", "鸟类", "城镇、农田和树林", "种子、昆虫和剩饭", "乌黑发亮的羽毛",
     "聪明到能解开简单的谜题", "聪明", True),
    ("蜗牛", "软体动物", "花园和潮湿的地方", "树叶和柔软的植物", "背上螺旋形的壳",
     "靠一层薄薄的黏液慢慢滑行", "慢而稳", True),
    ("蝴蝶", "昆虫", "花园和草地", "花蜜", "鲜艳多彩的翅膀",
     "小时候是一条毛毛虫", "蜕变", True),
]


# English / Chinese word pairs (used for reversal, repetition, translation)
WORDS = [
    ("apple", "苹果"), ("banana", "香蕉"), ("garden", "花园"), ("window", "窗户"),
    ("river", "河流"), ("teacher", "老师"), ("student", "学生"), ("computer", "电脑"),
    ("airplane", "飞机"), ("moon", "月亮"), ("sun", "太阳"), ("water", "水"),
    ("flower", "花朵"), ("mountain", "高山"), ("ocean", "海洋"), ("pencil", "铅笔"),
    ("table", "桌子"), ("chair", "椅子"), ("bread", "面包"), ("orange", "橙子"),
    ("tiger", "老虎"), ("rabbit", "兔子"), ("winter", "冬天"), ("summer", "夏天"),
    ("music", "音乐"), ("friend", "朋友"), ("school", "学校"), ("market", "市场"),
    ("kitchen", "厨房"), ("doctor", "医生"), ("bicycle", "自行车"), ("library", "图书馆"),
    ("rain", "雨"), ("cloud", "云"), ("star", "星星"), ("tree", "树"),
    ("book", "书"), ("candle", "蜡烛"), ("bridge", "桥"), ("castle", "城堡"),
    ("garlic", "大蒜"), ("tomato", "西红柿"), ("potato", "土豆"), ("carrot", "胡萝卜"),
    ("yellow", "黄色"), ("purple", "紫色"), ("green", "绿色"), ("silver", "银色"),
    ("planet", "行星"), ("rocket", "火箭"), ("train", "火车"), ("basket", "篮子"),
    ("pillow", "枕头"), ("blanket", "毯子"), ("lemon", "柠檬"), ("honey", "蜂蜜"),
    ("camera", "相机"), ("island", "岛屿"), ("forest", "森林"), ("desert", "沙漠"),
    ("dragon", "龙"), ("panda", "熊猫"), ("butterfly", "蝴蝶"), ("elephant", "大象"),
]

ZH_WORDS_EXTRA = [
    "熊猫", "电视机", "洗衣机", "图书馆", "动物园", "西瓜", "葡萄", "白云", "彩虹",
    "春天", "秋天", "早晨", "晚上", "老鼠", "小猫", "手机", "钥匙", "雨伞", "蛋糕",
    "牛奶", "大海", "小河", "火车站", "向日葵", "长颈鹿", "笔记本", "运动会", "红绿灯",
]

FIRST_NAMES_EN = ["Mia", "Tom", "Lena", "Sam", "Ava", "Leo", "Nora", "Ben", "Ivy", "Max",
                  "Zoe", "Finn", "Ruby", "Owen", "Lily", "Jack"]
SHE_NAMES_EN = {"Mia", "Lena", "Ava", "Nora", "Ivy", "Zoe", "Ruby", "Lily"}
FIRST_NAMES_ZH = ["小明", "小红", "小刚", "小丽", "阿青", "小雨", "乐乐", "天天", "小虎", "朵朵",
                  "小林", "安安", "小月", "豆豆", "阳阳", "小芳"]

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def a_an(word):
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


def cap(s):
    return s[0].upper() + s[1:]


def num_word_en(n):
    ones = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
            "seventeen", "eighteen", "nineteen"]
    tens = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10])
    if n < 1000:
        rest = n % 100
        return ones[n // 100] + " hundred" + ("" if rest == 0 else " and " + num_word_en(rest))
    return str(n)


def num_word_zh(n):
    digits = "零一二三四五六七八九"
    if n < 10:
        return digits[n]
    if n < 20:
        return "十" + ("" if n % 10 == 0 else digits[n % 10])
    if n < 100:
        return digits[n // 10] + "十" + ("" if n % 10 == 0 else digits[n % 10])
    if n < 1000:
        h, rest = n // 100, n % 100
        s = digits[h] + "百"
        if rest == 0:
            return s
        if rest < 10:
            return s + "零" + digits[rest]
        if rest < 20:
            return s + "一十" + ("" if rest % 10 == 0 else digits[rest % 10])
        return s + num_word_zh(rest)
    return str(n)


def num_count_zh(n):
    """Chinese numeral used before a measure word: 两 instead of 二 for 2."""
    return "两" if n == 2 else num_word_zh(n)


def build_record(rng, para_fn, lo, hi, max_len=1500, sep=" "):
    """Join paragraphs from para_fn until the text reaches a random target length."""
    target = rng.randint(lo, hi)
    text = ""
    tries = 0
    while len(text) < target:
        p = para_fn(rng)
        tries += 1
        if p[:40] in text and tries < 50:
            continue  # avoid repeating the same opening twice in one record
        cand = (text + sep + p) if text else p
        if len(cand) > max_len:
            if len(text) >= 300:
                break
            continue
        text = cand
    return text


def sentences_para(rng, first, pool, k_lo, k_hi, joiner=" "):
    k = min(len(pool), rng.randint(k_lo, k_hi))
    picked = rng.sample(pool, k)
    return joiner.join([first] + picked)


# ---------------------------------------------------------------------------
# Pretraining text: English
# ---------------------------------------------------------------------------


def en_animal_para(rng):
    name, plural, cls, habitat, food, trait, fact, symbol, wild = rng.choice(ANIMALS_EN)
    first = rng.choice([
        f"The {name} is {a_an(cls)} that lives in {habitat}.",
        f"{cap(plural)} are found in {habitat}.",
        f"Let us learn about the {name}, {a_an(cls)} that makes its home in {habitat}.",
    ])
    pool = [
        rng.choice([f"Its diet is made up of {food}.", f"{cap(a_an(name))} mostly eats {food}."]),
        f"You can usually recognise {a_an(name)} by {trait}.",
        f"One interesting fact is that the {name} {fact}.",
        f"Like all living things, {plural} need water, food and a safe place to rest.",
        f"Scientists who study {plural} often watch them quietly for hours and write down what they see.",
        f"Many children first meet the {name} in picture books and songs.",
        f"In many old stories, the {name} stands for {symbol}.",
        f"Because it is {a_an(cls)}, the {name} shares some features with other {cls}s." if cls != "mollusc"
        else f"Because it is a mollusc, the {name} is related to slugs and octopuses.",
    ]
    if wild:
        pool.append(f"If you ever see a wild {name}, keep a respectful distance and do not try to feed it.")
        pool.append(f"Protecting the places where {plural} live helps them survive for many years to come.")
    else:
        pool.append(f"Many families keep {plural}, and they need daily care, fresh water and kindness.")
        pool.append(f"People and {plural} have lived side by side for thousands of years.")
    return sentences_para(rng, first, pool, 3, 6)


def en_compare_para(rng):
    a, b = rng.sample(ANIMALS_EN, 2)
    return (f"The {a[0]} and the {b[0]} are very different. The {a[0]} lives in {a[3]}, while the "
            f"{b[0]} lives in {b[3]}. The {a[0]} eats {a[4]}, but the {b[0]} prefers {b[4]}. "
            f"Still, both of them need clean water and a safe home.")


CITY_PREFIX = ["River", "Oak", "Stone", "Mill", "Ash", "Lark", "Fern", "Maple", "Silver", "Bright", "Cedar", "Willow"]
CITY_SUFFIX = ["ton", "ford", "bridge", "brook", "field", "haven", "port", "dale", "wick", "moor"]
CITY_FAMOUS = [
    "its busy morning fish market", "an old clock tower that still rings every hour",
    "its quiet tea houses", "a large botanical garden full of rare plants",
    "a stone bridge that is more than three hundred years old", "its colourful spring flower festival",
    "a small but lively science museum", "the lanterns that line its canals at night",
    "a long sandy beach", "its bakeries and their fresh bread",
]
CITY_TRANSPORT = ["bicycles", "trams", "small ferries", "buses", "walking along narrow lanes", "an old railway line"]
CITY_FOOD = ["grilled fish with lemon", "warm noodle soup", "apple pie", "steamed dumplings",
             "roasted chestnuts", "fresh berries with cream", "spiced bean stew", "honey cakes"]
CITY_CLIMATE = [
    ("summers are warm and sunny", "winters are mild and rainy"),
    ("summers are hot and humid", "winters are short and cool"),
    ("summers are pleasant and breezy", "winters bring snow to the rooftops"),
    ("summers are dry", "winters are foggy and damp"),
]
RIVERS = ["Elm", "Lark", "Blue", "Swift", "Green", "Amber", "Heron", "Reed"]


def en_city_para(rng):
    city = rng.choice(CITY_PREFIX) + rng.choice(CITY_SUFFIX)
    river = rng.choice(RIVERS)
    pop = rng.choice([8, 12, 20, 35, 50, 75, 120, 180])
    summer, winter = rng.choice(CITY_CLIMATE)
    first = f"{city} is a small city built along the {river} River."
    pool = [
        f"About {pop} thousand people live there.",
        f"The city is best known for {rng.choice(CITY_FAMOUS)}.",
        f"Most people get around by {rng.choice(CITY_TRANSPORT)}.",
        f"In {city}, {summer}, and {winter}.",
        f"Visitors often try {rng.choice(CITY_FOOD)}, a favourite local dish.",
        f"A walk from the old town to the river takes about {rng.choice([10, 15, 20, 25, 30])} minutes.",
        f"There are {rng.choice([2, 3, 4, 5, 6, 7])} bridges across the river, and the oldest is made of stone.",
        f"On weekends, families in {city} like to have picnics in the park by the water.",
        f"The main library in {city} opens early, so students can study before school.",
        f"Every autumn, {city} holds a market where farmers sell apples, pumpkins and honey.",
    ]
    return sentences_para(rng, first, pool, 4, 7)


WEATHER_EN = {
    "rain": ("Rain begins high up in the clouds.", [
        "Clouds are made of tiny droplets of water or small pieces of ice.",
        "When many droplets join together, they become too heavy to float and fall as rain.",
        "Warm air can hold more water vapour than cold air.",
        "When warm, moist air rises and cools, the vapour turns back into liquid water.",
        "A light rain is called a drizzle, while a sudden heavy rain is called a downpour.",
        "Rain fills rivers and lakes and gives plants the water they need to grow.",
    ]),
    "snow": ("Snow forms when the air in a cloud is below freezing.", [
        "Instead of drops of water, tiny ice crystals grow in the cloud.",
        "Most snowflakes have six sides or six arms.",
        "Snowflakes stick together as they fall, forming larger flakes.",
        "Fresh snow is full of air, which is why it feels soft and muffles sound.",
        "When the ground is warm, snow melts as soon as it lands.",
        "Children love snow days, when they can build snowmen and go sledging.",
    ]),
    "fog": ("Fog is a cloud that touches the ground.", [
        "It often forms on calm, clear nights when the ground cools quickly.",
        "The cool ground chills the air above it until water vapour turns into tiny droplets.",
        "Thick fog makes it hard to see, so drivers slow down and turn on their lights.",
        "When the morning sun warms the air, the fog usually disappears.",
        "Fog is common near rivers, lakes and the sea.",
    ]),
    "thunderstorms": ("Thunderstorms grow from tall, towering clouds.", [
        "Inside these clouds, strong winds move ice and water up and down.",
        "This movement builds up electric charge, which is released as lightning.",
        "Lightning heats the air so quickly that it makes a loud boom called thunder.",
        "Light travels faster than sound, so we see the flash before we hear the thunder.",
        "During a storm, the safest place to be is inside a building.",
        "Counting the seconds between the flash and the thunder tells you roughly how far away the storm is.",
    ]),
    "wind": ("Wind is air that is moving from one place to another.", [
        "Air moves from places with high pressure to places with low pressure.",
        "The Sun warms the land and the sea by different amounts, and this makes the air move.",
        "By the sea, a gentle breeze often blows from the water onto the land in the afternoon.",
        "Strong winds can bend trees and knock over bins.",
        "People have used wind for centuries to sail boats and turn windmills.",
    ]),
    "rainbows": ("A rainbow appears when sunlight shines through raindrops.", [
        "Each drop bends the light and splits it into its colours.",
        "The colours are always in the same order: red, orange, yellow, green, blue, indigo and violet.",
        "To see a rainbow, you need the Sun behind you and rain in front of you.",
        "Sometimes a second, fainter rainbow appears above the first, with its colours reversed.",
        "Rainbows are most common after a shower on a sunny afternoon.",
    ]),
}


def en_weather_para(rng):
    if rng.random() < 0.35:
        city = rng.choice(CITY_PREFIX) + rng.choice(CITY_SUFFIX)
        sky, t_lo, t_hi, tip = rng.choice([
            ("clear and sunny", 18, 33, "Remember to drink plenty of water and wear a hat."),
            ("mild and sunny", 8, 20, "It is a good day for a walk in the park."),
            ("cloudy", 5, 22, "It may feel cool, so bring a light jacket."),
            ("grey with light rain", 4, 18, "Take an umbrella if you go out."),
            ("windy, with clouds racing by", 2, 16, "Hold on to your hat!"),
            ("foggy in the morning and bright later", 3, 14, "Drive carefully while the fog lasts."),
            ("snowing", -8, 1, "Wear a warm coat and gloves, and watch out for icy paths."),
        ])
        t = rng.randint(t_lo, t_hi)
        return (f"Here is the weather for {city}. Today it is {sky}, and the temperature is around "
                f"{t} degrees Celsius. Tomorrow will be {rng.choice(['a little warmer', 'a little cooler', 'much the same'])}. {tip}")
    key = rng.choice(sorted(WEATHER_EN))
    first, pool = WEATHER_EN[key]
    return sentences_para(rng, first, pool, 3, len(pool))


RECIPES_EN = [
    ("scrambled eggs", ["eggs", "a little butter", "salt", "pepper"], [
        "Crack the eggs into a bowl and beat them with a fork.",
        "Melt the butter in a pan over low heat.",
        "Pour in the eggs and stir them slowly with a spatula.",
        "Take the pan off the heat while the eggs are still soft, and season with salt and pepper.",
    ], "Cooking slowly on low heat keeps the eggs creamy.", 10),
    ("tomato soup", ["tomatoes", "an onion", "garlic", "vegetable stock", "olive oil"], [
        "Chop the onion and garlic and cook them in olive oil until soft.",
        "Add the chopped tomatoes and cook for five minutes.",
        "Pour in the stock and let the soup simmer for twenty minutes.",
        "Blend the soup until smooth and taste it before serving.",
    ], "A spoonful of cream on top makes it extra rich.", 35),
    ("pancakes", ["flour", "milk", "eggs", "a pinch of salt", "butter"], [
        "Mix the flour, milk, eggs and salt into a smooth batter.",
        "Heat a little butter in a frying pan.",
        "Pour in a small ladle of batter and tilt the pan to spread it.",
        "Flip the pancake when the edges turn golden, and cook the other side.",
    ], "Let the batter rest for ten minutes for softer pancakes.", 25),
    ("fried rice", ["cooked rice", "eggs", "peas", "carrots", "spring onions", "soy sauce"], [
        "Heat oil in a wok and scramble the eggs, then set them aside.",
        "Stir-fry the carrots and peas for two minutes.",
        "Add the rice and break up any lumps.",
        "Return the eggs, add soy sauce and spring onions, and toss everything together.",
    ], "Rice cooked the day before works best because it is drier.", 15),
    ("a fruit salad", ["apples", "bananas", "oranges", "grapes", "a squeeze of lemon juice"], [
        "Wash all the fruit well.",
        "Cut the apples, bananas and oranges into small pieces.",
        "Put everything in a large bowl with the grapes.",
        "Add lemon juice and stir gently so the fruit does not turn brown.",
    ], "Chill the salad for half an hour before serving.", 15),
    ("a cup of tea", ["a tea bag or loose tea", "fresh water", "milk or lemon if you like"], [
        "Boil fresh water in a kettle.",
        "Warm the cup or pot with a little hot water, then pour it away.",
        "Add the tea and pour in the hot water.",
        "Let it steep for three to five minutes, then remove the tea.",
    ], "Green tea tastes better with water that is hot but not boiling.", 6),
    ("vegetable soup", ["carrots", "potatoes", "celery", "an onion", "vegetable stock", "herbs"], [
        "Peel and chop all the vegetables into small cubes.",
        "Soften the onion in a large pot with a little oil.",
        "Add the other vegetables and the stock.",
        "Simmer for about twenty-five minutes until the potatoes are tender.",
    ], "Soup often tastes even better the next day.", 40),
    ("banana bread", ["ripe bananas", "flour", "sugar", "eggs", "melted butter", "baking soda"], [
        "Mash the bananas in a large bowl.",
        "Stir in the melted butter, sugar and eggs.",
        "Fold in the flour and baking soda until just combined.",
        "Pour the mixture into a loaf tin and bake for about fifty minutes.",
    ], "The browner the bananas, the sweeter the bread.", 70),
    ("a simple salad", ["lettuce", "cucumber", "tomatoes", "olive oil", "vinegar", "salt"], [
        "Wash and dry the lettuce, then tear it into pieces.",
        "Slice the cucumber and cut the tomatoes into wedges.",
        "Whisk together the oil, vinegar and a pinch of salt.",
        "Pour the dressing over the salad just before eating.",
    ], "Dry leaves hold the dressing much better than wet ones.", 10),
    ("porridge", ["rolled oats", "milk or water", "a pinch of salt", "honey"], [
        "Put the oats and milk in a small pot.",
        "Bring it to a gentle simmer over medium heat.",
        "Stir often for about five minutes until thick and creamy.",
        "Serve with honey and some fresh fruit on top.",
    ], "Stirring stops the porridge from sticking to the pot.", 10),
]


def en_cooking_para(rng):
    dish, ings, steps, tip, minutes = rng.choice(RECIPES_EN)
    style = rng.randint(0, 2)
    if style == 0:
        lines = [f"How to make {dish}.", "You will need " + ", ".join(ings[:-1]) + " and " + ings[-1] + "."]
        for i, s in enumerate(steps, 1):
            lines.append(f"Step {i}: {s}")
        lines.append(f"Tip: {tip}")
        return "\n".join(lines)
    if style == 1:
        order = ["First", "Next", "Then", "Finally"]
        body = " ".join(f"{o}, {s[0].lower() + s[1:]}" for o, s in zip(order, steps))
        return (f"Making {dish} is easier than many people think, and it takes about {minutes} minutes. "
                f"{body} {tip}")
    serves = rng.randint(2, 6)
    return (f"This recipe for {dish} serves {serves} people. The ingredients are "
            + ", ".join(ings[:-1]) + " and " + ings[-1] + f". {steps[0]} {steps[-1]} {tip}")


SCIENCE_EN = [
    ("Water is one of the most important substances on Earth.", [
        "It can be a solid, a liquid or a gas.",
        "At sea level, pure water freezes at 0 degrees Celsius and boils at 100 degrees Celsius.",
        "Ice floats because it is less dense than liquid water.",
        "When water evaporates, it becomes an invisible gas called water vapour.",
        "The water cycle moves water from the oceans to the sky and back to the land as rain.",
    ], "You can see evaporation for yourself: put a saucer of water on a sunny windowsill and check it each day."),
    ("Light lets us see the world around us.", [
        "Light travels in straight lines and moves faster than anything else.",
        "Light from the Sun takes about eight minutes to reach the Earth.",
        "White light is a mix of all the colours of the rainbow.",
        "A shadow forms when an object blocks the light.",
        "Mirrors reflect light, and lenses bend it.",
    ], "Try this: shine a torch at a glass of water in a dark room and watch how the beam bends."),
    ("Sound is made when something vibrates.", [
        "The vibrations travel through the air as waves.",
        "Sound travels faster through water than through air, and even faster through solid materials.",
        "In empty space there is no air, so there is no sound at all.",
        "Fast vibrations make high notes, and slow vibrations make low notes.",
        "Our ears collect sound waves and turn them into signals for the brain.",
    ], "Stretch a rubber band over an open box and pluck it to feel the vibration that makes the sound."),
    ("Our solar system has one star, the Sun, and eight planets.", [
        "The Earth takes about 365 days to travel once around the Sun.",
        "The Moon travels around the Earth about once a month.",
        "Jupiter is the largest planet, and Mercury is the smallest.",
        "The Moon has no light of its own; it reflects light from the Sun.",
        "Day and night happen because the Earth spins once every twenty-four hours.",
    ], "On a clear night, look for the brightest point that does not twinkle: it is often a planet."),
    ("Plants make their own food.", [
        "They use sunlight, water and carbon dioxide from the air.",
        "This process is called photosynthesis, and it releases oxygen.",
        "Roots hold the plant in the soil and take up water.",
        "Leaves are usually green because they contain a substance called chlorophyll.",
        "Many plants make seeds, which can grow into new plants.",
    ], "Place a bean on damp paper in a jar and watch the root and shoot appear within a week."),
    ("Magnets can push and pull without touching.", [
        "Every magnet has a north pole and a south pole.",
        "Opposite poles attract each other, and like poles push each other away.",
        "Magnets pull on iron, nickel and cobalt, but not on wood or plastic.",
        "The Earth itself behaves like a giant magnet, which is why a compass points north.",
    ], "Rub a needle with a magnet many times in one direction, and it becomes a weak magnet too."),
    ("The human body is made of many parts that work together.", [
        "The heart pumps blood around the body all day and all night.",
        "The lungs take in oxygen when we breathe in.",
        "An adult has 206 bones in the skeleton.",
        "Muscles pull on bones to make us move.",
        "The brain sends messages through the nerves to every part of the body.",
    ], "Put two fingers on your wrist and count your pulse for fifteen seconds, then multiply by four."),
    ("Electricity is the flow of tiny charged particles called electrons.", [
        "Electricity can only flow around a complete loop, called a circuit.",
        "Metals such as copper let electricity flow easily, so they are called conductors.",
        "Rubber and plastic block electricity, so they are used to cover wires.",
        "A battery stores energy and pushes electricity around a circuit.",
    ], "Never play with sockets; simple experiments should only use small batteries."),
]


def en_science_para(rng):
    first, pool, exp = rng.choice(SCIENCE_EN)
    p = sentences_para(rng, first, pool, 3, len(pool))
    if rng.random() < 0.6:
        p += " " + exp
    return p


def en_story_para(rng):
    name = rng.choice(FIRST_NAMES_EN)
    he, his = ("she", "her") if name in SHE_NAMES_EN else ("he", "his")
    if rng.random() < 0.5:
        creature = "girl" if he == "she" else "boy"
    else:
        creature = rng.choice(["little fox", "young rabbit", "curious crow", "small turtle", "brave mouse"])
    place = rng.choice(["a village by the sea", "a house at the edge of the forest", "a busy town with a big market",
                        "a farm on a green hill", "a quiet street full of old trees"])
    kind = rng.randint(0, 2)
    if kind == 0:
        item = rng.choice(["red scarf", "favourite book", "silver key", "blue kite", "little wooden boat"])
        look1, look2 = rng.sample(["under the bed", "in the garden", "behind the door", "by the river",
                                   "in the kitchen", "near the old well"], 2)
        helper = rng.choice(["a kind old neighbour", "a friendly dog", "a wise owl", "an older sister", "a curious squirrel"])
        end = rng.choice(["it was hanging on a branch, waving in the wind", "it was lying safely in a basket of apples",
                          "a bird had carried it to its nest", "it had been in the coat pocket all along"])
        moral = rng.choice(["asking for help is nothing to be ashamed of", "a calm mind finds things faster",
                            "friends make every problem smaller"])
        return (f"Once upon a time, in {place}, there lived {a_an(creature)} named {name}. "
                f"One morning, {name} found that {his} {item} was missing. {cap(he)} looked {look1} and "
                f"{look2}, but it was nowhere to be seen. Then {helper} came by and asked what was wrong. "
                f"Together they searched carefully, step by step, until at last they found that {end}. "
                f"{name} laughed and said thank you. From that day on, {name} remembered that {moral}.")
    if kind == 1:
        skill = rng.choice(["ride a bicycle", "swim across the pond", "bake bread", "play the flute", "read a map"])
        days = rng.randint(3, 12)
        return (f"{name} was {a_an(creature)} who lived in {place}. More than anything, {he} wanted to learn to {skill}. "
                f"The first try went badly, and the second was not much better. But {name} did not give up. "
                f"Every day {he} practised a little, and every day it became a little easier. "
                f"After {num_word_en(days)} days, {name} could finally {skill}, and everyone cheered. "
                f"{cap(he)} learned that small steps, taken every day, can lead a long way.")
    weather = rng.choice(["a sudden storm", "a heavy snowfall", "a strong wind", "a long dry summer"])
    thing = rng.choice(["the garden fence", "the little bridge", "the roof of the shed", "the vegetable patch"])
    friends = rng.randint(2, 6)
    return (f"In {place} lived {a_an(creature)} called {name}. One year, {weather} damaged {thing}. "
            f"{name} could not fix it alone, so {he} asked {num_word_en(friends)} friends for help. "
            f"One friend brought tools, another brought food, and the others carried wood and water. "
            f"By evening the work was done, and they all sat together to share a warm meal. "
            f"{name} smiled, because a job that seemed impossible for one was easy for many.")


def en_math_para(rng):
    kind = rng.randint(0, 3)
    if kind == 0:
        n = rng.randint(2, 12)
        rows = ", ".join(f"{n} × {i} = {n * i}" for i in range(1, 11))
        return (f"Here is the multiplication table for {n}: {rows}. "
                f"Notice that each answer is {n} more than the one before it.")
    if kind == 1:
        a = rng.randint(1, 20)
        facts = []
        for b in rng.sample(range(1, 21), 5):
            facts.append(f"{num_word_en(a)} plus {num_word_en(b)} is {num_word_en(a + b)}, so {a} + {b} = {a + b}.")
        return "Some addition facts: " + " ".join(cap(f) for f in facts)
    if kind == 2:
        out = []
        for _ in range(3):
            n = rng.choice(FIRST_NAMES_EN)
            thing = rng.choice(["apples", "marbles", "pencils", "stickers", "books", "shells"])
            x, y = rng.randint(3, 20), rng.randint(1, 15)
            if rng.random() < 0.5:
                out.append(f"{n} has {x} {thing} and gets {y} more. Now {n} has {x} + {y} = {x + y} {thing}.")
            else:
                x = x + y
                out.append(f"{n} has {x} {thing} and gives away {y}. Now {n} has {x} - {y} = {x - y} {thing}.")
        return "Word problems help us use arithmetic in daily life. " + " ".join(out)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return (f"To add {a} and {b}, first add the tens: {a // 10 * 10} + {b // 10 * 10} = {a // 10 * 10 + b // 10 * 10}. "
            f"Then add the ones: {a % 10} + {b % 10} = {a % 10 + b % 10}. "
            f"Finally put them together: {a // 10 * 10 + b // 10 * 10} + {a % 10 + b % 10} = {a + b}. "
            f"So {a} + {b} = {a + b}. An even number can be split into two equal groups; "
            f"{a} is {'even' if a % 2 == 0 else 'odd'} and {b} is {'even' if b % 2 == 0 else 'odd'}.")


def en_code_para(rng):
    kind = rng.randint(0, 5)
    if kind == 0:
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        fn = rng.choice(["add", "plus", "total"])
        return (f"In Python, a function is defined with the def keyword. This small function adds two numbers:\n\n"
                f"def {fn}(a, b):\n    return a + b\n\nprint({fn}({a}, {b}))\n\n"
                f"Running this program prints {a + b}, because {a} + {b} = {a + b}.")
    if kind == 1:
        w = rng.choice(WORDS)[0]
        return (f"Reversing a string in Python is easy with slicing. The expression word[::-1] steps through the "
                f"string backwards:\n\nword = \"{w}\"\nprint(word[::-1])\n\n"
                f"This prints \"{w[::-1]}\". The same trick works for lists too.")
    if kind == 2:
        n = rng.randint(3, 8)
        f = 1
        for i in range(2, n + 1):
            f *= i
        return (f"The factorial of a number is the product of all whole numbers from 1 up to it. "
                f"Here is a loop that computes it:\n\ndef factorial(n):\n    result = 1\n    for i in range(2, n + 1):\n"
                f"        result *= i\n    return result\n\nprint(factorial({n}))\n\nThe output is {f}.")
    if kind == 3:
        nums = [rng.randint(1, 20) for _ in range(rng.randint(4, 7))]
        return (f"Python lists can hold many values. The built-in functions sum, min and max work on them:\n\n"
                f"numbers = {nums}\nprint(sum(numbers))\nprint(min(numbers), max(numbers))\n\n"
                f"The first line prints {sum(nums)}, and the second prints {min(nums)} {max(nums)}.")
    if kind == 4:
        fruits = rng.sample(["apple", "banana", "cherry", "grape", "mango", "pear", "plum"], 3)
        body = "\n".join(f"I like {x}" for x in fruits)
        return (f"A for loop repeats code once for each item in a list:\n\nfruits = {json.dumps(fruits)}\n"
                f"for fruit in fruits:\n    print(\"I like\", fruit)\n\nThe program prints:\n{body}")
    word = rng.choice(WORDS)[0]
    v = sum(1 for ch in word if ch in "aeiou")
    return (f"This function counts the vowels in a word:\n\ndef count_vowels(word):\n    return sum(1 for ch in word if ch in \"aeiou\")\n\n"
            f"print(count_vowels(\"{word}\"))\n\nFor the word \"{word}\" it prints {v}.")


EMOJI_EN = [
    "Weekend plan ☀️: a walk in the park (公园), lunch with friends 🍜, and an early night 😴.",
    "Shopping list 🛒: apples 🍎, bread 🍞, milk 🥛 and some 西红柿 (tomatoes) for the soup.",
    "Today I learned two new Chinese words: 你好 means hello 👋, and 谢谢 means thank you 🙏.",
    "The cat 🐱 slept on the sofa all afternoon while the rain 🌧️ tapped on the window.",
    "Happy birthday 🎂🎉! We had cake, played games and sang songs until the stars ⭐ came out.",
    "Traffic lights 🚦: red means stop, yellow means wait, green means go 🚗.",
    "Our class planted sunflowers 🌻 this spring. 向日葵 is the Chinese word for sunflower.",
    "Café au lait, crème brûlée and jalapeño are words that English borrowed from other languages ☕.",
    "Good morning 🌅! 早上好! Bonjour! Three ways to start the day with a smile 😊.",
    "The train 🚆 leaves at 8:15, arrives in the city at 9:40, and the ticket costs 12 dollars.",
]


def en_emoji_para(rng):
    return " ".join(rng.sample(EMOJI_EN, 3))


# ---------------------------------------------------------------------------
# Pretraining text: Chinese
# ---------------------------------------------------------------------------


def zh_animal_para(rng):
    name, cls, habitat, food, trait, fact, symbol, wild = rng.choice(ANIMALS_ZH)
    first = rng.choice([
        f"{name}是一种{cls}，生活在{habitat}。",
        f"人们常常能在{habitat}见到{name}。",
        f"下面来认识一下{name}，它是一种{cls}，家在{habitat}。",
    ])
    pool = [
        rng.choice([f"它主要吃{food}。", f"{name}的食物包括{food}。"]),
        f"人们通常可以通过{trait}认出{name}。",
        f"有趣的是，{name}{fact}。",
        f"和所有生物一样，{name}也需要水、食物和安全的休息场所。",
        f"研究{name}的科学家常常安静地观察好几个小时，并把看到的情况记录下来。",
        f"很多孩子是从图画书和儿歌里第一次认识{name}的。",
        f"在一些古老的故事里，{name}象征着{symbol}。",
    ]
    if wild:
        pool.append(f"如果在野外遇到{name}，最好保持距离，不要随意喂食。")
        pool.append(f"保护{name}生活的环境，才能让它们长久地生存下去。")
    else:
        pool.append(f"很多家庭都养{name}，它们需要每天的照顾、干净的水和主人的耐心。")
        pool.append(f"人和{name}已经一起生活了几千年。")
    return sentences_para(rng, first, pool, 3, 6, joiner="")


def zh_compare_para(rng):
    a, b = rng.sample(ANIMALS_ZH, 2)
    return (f"{a[0]}和{b[0]}很不一样。{a[0]}生活在{a[2]}，而{b[0]}生活在{b[2]}。"
            f"{a[0]}吃{a[3]}，{b[0]}则喜欢吃{b[3]}。不过，它们都需要干净的水和安全的家。")


ZH_CITY_A = ["青", "柳", "云", "白", "松", "明", "金", "石", "桃", "枫", "清", "银"]
ZH_CITY_B = ["河", "桥", "湖", "溪", "山", "港", "水", "林"]
ZH_CITY_FAMOUS = ["热闹的早市", "一座每小时都会敲响的老钟楼", "安静的老茶馆", "种满奇花异草的植物园",
                  "一座三百多年的石拱桥", "春天的花灯节", "一座小而有趣的科学馆", "夜晚沿河挂起的灯笼",
                  "长长的沙滩", "香喷喷的烧饼铺"]
ZH_CITY_TRANSPORT = ["骑自行车", "坐有轨电车", "坐小渡船", "坐公交车", "在小巷里步行"]
ZH_CITY_FOOD = ["清蒸鱼", "热汤面", "桂花糕", "鲜肉包子", "糖炒栗子", "豆花", "葱油饼", "酸菜鱼"]
ZH_CITY_CLIMATE = [("夏天温暖晴朗", "冬天温和多雨"), ("夏天炎热潮湿", "冬天短暂凉爽"),
                   ("夏天凉风习习", "冬天屋顶常常积雪"), ("夏天干燥", "冬天多雾潮湿")]


def zh_city_para(rng):
    city = rng.choice(ZH_CITY_A) + rng.choice(ZH_CITY_B) + rng.choice(["镇", "市", "城"])
    river = rng.choice(["青", "碧", "玉", "长", "清", "明"]) + rng.choice(["河", "江", "溪"])
    summer, winter = rng.choice(ZH_CITY_CLIMATE)
    first = f"{city}是一座建在{river}边上的小城。"
    pool = [
        f"那里大约住着{num_count_zh(rng.choice([1, 2, 3, 5, 8, 12, 20]))}万人。",
        f"这座城最有名的是{rng.choice(ZH_CITY_FAMOUS)}。",
        f"当地人出门大多{rng.choice(ZH_CITY_TRANSPORT)}。",
        f"{city}{summer}，{winter}。",
        f"来这里的游客常常会尝一尝当地的{rng.choice(ZH_CITY_FOOD)}。",
        f"从老城区走到河边，大约需要{num_word_zh(rng.choice([10, 15, 20, 30]))}分钟。",
        f"河上一共有{num_count_zh(rng.choice([2, 3, 4, 5, 6]))}座桥，最老的一座是石桥。",
        f"周末的时候，{city}的家庭喜欢在河边的公园里野餐。",
        f"{city}的图书馆开门很早，学生们上学前可以先去看一会儿书。",
        f"每年秋天，{city}都会举办集市，农民们在那里卖苹果、南瓜和蜂蜜。",
    ]
    return sentences_para(rng, first, pool, 4, 7, joiner="")


WEATHER_ZH = {
    "雨": ("雨是从高高的云里落下来的。", [
        "云是由无数小水滴或小冰晶组成的。", "许多小水滴聚在一起，变得太重，就会落下来成为雨。",
        "暖空气比冷空气能容纳更多的水汽。", "潮湿的暖空气上升变冷后，水汽就会重新变成小水滴。",
        "细细的小雨叫毛毛雨，突然下得很大的雨叫暴雨。", "雨水流进江河湖泊，也让植物得到生长所需的水分。"]),
    "雪": ("当云里的温度低于零度时，就可能下雪。", [
        "这时云里长出的不是水滴，而是小小的冰晶。", "大多数雪花都有六个角。",
        "雪花在飘落的过程中会粘在一起，变成更大的雪片。", "新下的雪里有很多空气，所以摸起来很软，还能吸收声音。",
        "如果地面比较暖，雪一落地就会融化。", "下雪天，孩子们最喜欢堆雪人、打雪仗。"]),
    "雾": ("雾其实就是贴着地面的云。", [
        "它常常出现在无风、晴朗的夜晚之后。", "地面很快变凉，把上方的空气也冷却了，水汽就变成了小水滴。",
        "大雾天看不清远处，司机需要放慢速度并打开车灯。", "早晨太阳出来后，空气变暖，雾通常就散了。",
        "河流、湖泊和海边更容易起雾。"]),
    "雷雨": ("雷雨来自又高又厚的积雨云。", [
        "云里的强风把冰粒和水滴上下搬动。", "这种运动让云里积累了电荷，放电时就产生了闪电。",
        "闪电让空气瞬间变得极热，发出巨大的响声，这就是雷声。", "光比声音跑得快，所以我们总是先看到闪电，后听到雷声。",
        "打雷的时候，待在房子里是最安全的。"]),
    "风": ("风就是流动的空气。", [
        "空气会从气压高的地方流向气压低的地方。", "太阳晒热陆地和海洋的程度不同，于是空气开始流动。",
        "在海边，下午常常有从海上吹向陆地的微风。", "大风能把树吹弯，把垃圾桶吹倒。",
        "很久以前，人们就用风来推动帆船、转动风车。"]),
    "彩虹": ("阳光照进雨滴时，天上就可能出现彩虹。", [
        "每一颗雨滴都会让光线弯折，并把它分成不同的颜色。", "彩虹的颜色顺序总是红、橙、黄、绿、蓝、靛、紫。",
        "想看到彩虹，太阳要在你身后，雨要在你前面。", "有时在第一道彩虹上方还会出现一道颜色较淡、顺序相反的彩虹。",
        "雨后放晴的下午最容易看到彩虹。"]),
}


def zh_weather_para(rng):
    if rng.random() < 0.35:
        city = rng.choice(ZH_CITY_A) + rng.choice(ZH_CITY_B) + "市"
        sky, t_lo, t_hi, tip = rng.choice([
            ("晴朗炎热", 25, 35, "记得多喝水，出门戴好帽子。"),
            ("晴朗温和", 10, 22, "很适合去公园散步。"),
            ("多云", 5, 22, "早晚有点凉，可以带一件薄外套。"),
            ("阴天有小雨", 4, 18, "出门记得带伞。"),
            ("有大风", 2, 16, "注意关好门窗。"),
            ("早上有雾，下午转晴", 3, 14, "有雾时开车请放慢速度。"),
            ("下雪", -8, 1, "请穿上厚外套，戴好手套，小心路滑。"),
        ])
        t = rng.randint(t_lo, t_hi)
        t_txt = f"零下{num_word_zh(-t)}" if t < 0 else num_word_zh(t)
        return (f"下面是{city}的天气预报。今天{sky}，气温大约{t_txt}摄氏度。"
                f"明天{rng.choice(['稍微暖和一些', '稍微凉快一些', '和今天差不多'])}。{tip}")
    key = rng.choice(sorted(WEATHER_ZH))
    first, pool = WEATHER_ZH[key]
    return sentences_para(rng, first, pool, 3, len(pool), joiner="")


RECIPES_ZH = [
    ("番茄炒蛋", ["番茄两个", "鸡蛋三个", "盐", "少许糖", "葱花"], [
        "把鸡蛋打进碗里，加一点盐搅匀。", "番茄洗净，切成小块。", "锅里放油，先把鸡蛋炒到刚凝固，盛出备用。",
        "再放一点油，把番茄炒出汁，然后倒回鸡蛋，加盐和糖翻炒均匀。"], "番茄炒软一些，汤汁会更浓。", 15),
    ("蛋炒饭", ["隔夜米饭", "鸡蛋", "豌豆", "胡萝卜丁", "葱", "酱油"], [
        "锅中放油，把鸡蛋炒散后盛出。", "放入胡萝卜丁和豌豆翻炒两分钟。", "倒入米饭，用铲子把结块压散。",
        "加入鸡蛋、酱油和葱花，大火翻炒均匀。"], "用隔夜饭炒出来的饭更加粒粒分明。", 15),
    ("西红柿鸡蛋汤", ["西红柿", "鸡蛋", "清水", "盐", "香油"], [
        "西红柿切块，在锅里用少许油炒软。", "加入清水，大火烧开。", "把打散的鸡蛋慢慢倒入锅中，边倒边轻轻搅动。",
        "加盐调味，出锅前滴几滴香油。"], "蛋液要细细地倒，蛋花才会漂亮。", 15),
    ("凉拌黄瓜", ["黄瓜两根", "蒜末", "醋", "生抽", "盐", "香油"], [
        "黄瓜洗净，用刀背拍碎后切成段。", "加一点盐腌十分钟，倒掉多余的水。", "加入蒜末、醋、生抽和香油。",
        "拌匀后放进冰箱冷藏一会儿再吃。"], "拍过的黄瓜更容易入味。", 20),
    ("水果沙拉", ["苹果", "香蕉", "橙子", "葡萄", "酸奶"], [
        "把所有水果洗干净。", "苹果、香蕉和橙子切成小块。", "把水果和葡萄一起放进大碗里。",
        "倒入酸奶，轻轻拌匀。"], "挤几滴柠檬汁可以防止苹果变色。", 15),
    ("一杯热茶", ["茶叶", "清水"], [
        "把清水烧开。", "先用热水烫一下杯子，再把水倒掉。", "放入茶叶，倒入热水。",
        "泡三到五分钟就可以喝了。"], "泡绿茶时，水温不要太高，八十度左右最好。", 6),
    ("小米粥", ["小米", "清水", "少许红枣"], [
        "小米淘洗干净。", "锅里加水烧开，倒入小米。", "转小火慢慢煮，期间搅拌几次防止粘锅。",
        "煮到粥变得浓稠就可以了。"], "加几颗红枣，粥会带一点甜味。", 40),
    ("葱油饼", ["面粉", "温水", "葱花", "盐", "食用油"], [
        "面粉加温水揉成光滑的面团，醒二十分钟。", "把面团擀薄，刷一层油，撒上盐和葱花。",
        "卷起来再盘成圆形，轻轻擀平。", "平底锅刷油，小火把饼煎到两面金黄。"], "面团醒得越充分，饼越柔软。", 45),
    ("蒸鸡蛋羹", ["鸡蛋两个", "温水", "盐", "生抽", "葱花"], [
        "鸡蛋打散，加入一倍半的温水和一点盐。", "把蛋液过筛，撇去表面的泡沫。",
        "盖上盘子或保鲜膜，水开后中小火蒸十分钟。", "出锅后淋上生抽，撒上葱花。"], "盖上盖子蒸，表面才会光滑。", 20),
]


def zh_cooking_para(rng):
    dish, ings, steps, tip, minutes = rng.choice(RECIPES_ZH)
    style = rng.randint(0, 2)
    if style == 0:
        lines = [f"怎样做{dish}。", "需要准备：" + "、".join(ings) + "。"]
        for i, s in enumerate(steps, 1):
            lines.append(f"第{num_word_zh(i)}步：{s}")
        lines.append(f"小窍门：{tip}")
        return "\n".join(lines)
    if style == 1:
        order = ["首先，", "接着，", "然后，", "最后，"]
        body = "".join(o + s for o, s in zip(order, steps))
        return f"做{dish}其实并不难，大约需要{num_word_zh(minutes)}分钟。{body}{tip}"
    return f"这份{dish}的做法可以供{num_count_zh(rng.randint(2, 5))}个人吃。材料有" + "、".join(ings) + f"。{steps[0]}{steps[-1]}{tip}"


SCIENCE_ZH = [
    ("水是地球上最重要的物质之一。", [
        "水可以是固体、液体，也可以是气体。", "在海平面上，纯水在零摄氏度结冰，在一百摄氏度沸腾。",
        "冰能浮在水面上，因为冰的密度比水小。", "水蒸发后，会变成看不见的水蒸气。",
        "水循环让水从海洋升到天空，再以雨的形式回到陆地。"],
     "你可以自己观察蒸发：在阳光充足的窗台上放一碟水，每天看看它的变化。"),
    ("光让我们看见周围的世界。", [
        "光沿直线传播，比任何东西都跑得快。", "太阳光到达地球大约需要八分钟。",
        "白光其实是彩虹中各种颜色的光混合在一起。", "物体挡住光线时，就会形成影子。", "镜子能反射光，透镜能让光弯折。"],
     "试一试：在暗室里用手电筒照一杯水，看看光束是怎样弯折的。"),
    ("声音是由物体振动产生的。", [
        "振动以波的形式在空气中传播。", "声音在水中比在空气中传得快，在固体中传得更快。",
        "太空中没有空气，所以听不到任何声音。", "振动得快，声音就高；振动得慢，声音就低。",
        "耳朵收集声波，再把它变成信号传给大脑。"],
     "把橡皮筋套在空盒子上拨一拨，就能感觉到发出声音的振动。"),
    ("我们的太阳系有一颗恒星——太阳，还有八大行星。", [
        "地球绕太阳转一圈大约需要三百六十五天。", "月亮大约一个月绕地球转一圈。",
        "木星是最大的行星，水星是最小的行星。", "月亮自己不发光，它反射的是太阳的光。",
        "地球每二十四小时自转一圈，所以有了白天和黑夜。"],
     "晴朗的夜晚，找一找那个最亮却不闪烁的光点，它常常是一颗行星。"),
    ("植物能自己制造食物。", [
        "它们利用阳光、水和空气中的二氧化碳。", "这个过程叫做光合作用，同时会放出氧气。",
        "根把植物固定在土里，并吸收水分。", "叶子通常是绿色的，因为里面含有叶绿素。",
        "许多植物会结出种子，种子又能长成新的植物。"],
     "把一颗豆子放在瓶子里的湿纸巾上，一周之内就能看到它长出根和芽。"),
    ("磁铁不用接触就能吸引或推开东西。", [
        "每块磁铁都有北极和南极。", "异极相吸，同极相斥。",
        "磁铁能吸住铁、镍和钴，却吸不住木头和塑料。", "地球本身就像一块巨大的磁铁，所以指南针能指示方向。"],
     "用磁铁沿同一个方向摩擦一根针很多次，针也会变成一块弱磁铁。"),
    ("人的身体由许多部分组成，它们互相配合。", [
        "心脏日夜不停地把血液输送到全身。", "我们吸气时，肺会吸进氧气。",
        "成年人的骨骼一共有二百零六块骨头。", "肌肉拉动骨头，让我们能够活动。",
        "大脑通过神经把信息传到身体的各个部分。"],
     "把两根手指放在手腕上，数十五秒的脉搏，再乘以四，就是一分钟的心跳次数。"),
]


def zh_science_para(rng):
    first, pool, exp = rng.choice(SCIENCE_ZH)
    p = sentences_para(rng, first, pool, 3, len(pool), joiner="")
    if rng.random() < 0.6:
        p += exp
    return p


def zh_story_para(rng):
    name = rng.choice(FIRST_NAMES_ZH)
    place = rng.choice(["海边的小村子", "森林边上的小房子", "一个有大集市的热闹小镇", "绿色山坡上的农场", "种满老树的安静街道"])
    kind = rng.randint(0, 2)
    if kind == 0:
        item = rng.choice(["红围巾", "最喜欢的故事书", "银色钥匙", "蓝色风筝", "小木船"])
        l1, l2 = rng.sample(["床底下", "花园里", "门后面", "小河边", "厨房里", "老井旁边"], 2)
        helper = rng.choice(["隔壁好心的老奶奶", "一只友好的小狗", "一只聪明的猫头鹰", "姐姐", "一只好奇的松鼠"])
        end = rng.choice(["它挂在树枝上，在风中飘来飘去", "它安安稳稳地躺在一篮苹果里",
                          "原来是一只小鸟把它叼回了窝里", "它一直就在外套口袋里"])
        moral = rng.choice(["向别人求助并不丢人", "遇事冷静才能更快找到办法", "有朋友在，困难就会变小"])
        return (f"从前，在{place}里，住着一个叫{name}的孩子。一天早上，{name}发现自己的{item}不见了。"
                f"{name}找了{l1}，又找了{l2}，可是哪儿都没有。这时，{helper}走过来，问发生了什么事。"
                f"他们一起仔仔细细地找，终于发现{end}。{name}笑着说了声谢谢。从那天起，{name}记住了：{moral}。")
    if kind == 1:
        skill = rng.choice(["骑自行车", "游过池塘", "烤面包", "吹笛子", "看地图"])
        days = rng.randint(3, 12)
        return (f"{name}住在{place}里，最大的愿望就是学会{skill}。第一次尝试很不顺利，第二次也好不到哪里去。"
                f"但是{name}没有放弃，每天都练习一点点，每天都比前一天容易一些。"
                f"{num_word_zh(days)}天以后，{name}终于学会了{skill}，大家都为{name}鼓掌。"
                f"{name}明白了一个道理：每天迈出一小步，也能走很远的路。")
    weather = rng.choice(["一场突如其来的暴风雨", "一场大雪", "一阵大风", "一个漫长干旱的夏天"])
    thing = rng.choice(["花园的篱笆", "小木桥", "小棚子的屋顶", "菜园"])
    friends = rng.randint(2, 6)
    return (f"{name}住在{place}里。有一年，{weather}毁坏了{thing}。{name}一个人修不好，就请了{num_count_zh(friends)}个朋友来帮忙。"
            f"有的朋友带来了工具，有的带来了饭菜，其他人帮忙搬木头、提水。到了傍晚，活儿全干完了，大家坐在一起吃了一顿热乎乎的饭。"
            f"{name}笑了，因为一个人做不到的事，大家一起做就容易多了。")


def koujue(i, n):
    """One line of the Chinese multiplication rhyme, e.g. 三四十二, 二三得六, 二五一十."""
    p = i * n
    if p < 10:
        return f"{num_word_zh(i)}{num_word_zh(n)}得{num_word_zh(p)}"
    if p == 10:
        return f"{num_word_zh(i)}{num_word_zh(n)}一十"
    return f"{num_word_zh(i)}{num_word_zh(n)}{num_word_zh(p)}"


def zh_math_para(rng):
    kind = rng.randint(0, 3)
    if kind == 0:
        n = rng.randint(2, 9)
        rows = "，".join(koujue(i, n) for i in range(1, n + 1))
        rows2 = "，".join(f"{n} × {i} = {n * i}" for i in range(1, 11))
        return f"乘法口诀里关于{num_word_zh(n)}的部分是：{rows}。写成算式就是：{rows2}。每个结果都比前一个多{n}。"
    if kind == 1:
        a = rng.randint(1, 20)
        facts = [f"{num_word_zh(a)}加{num_word_zh(b)}等于{num_word_zh(a + b)}，也就是{a} + {b} = {a + b}。"
                 for b in rng.sample(range(1, 21), 5)]
        return "下面是一些加法算式：" + "".join(facts)
    if kind == 2:
        out = []
        for _ in range(3):
            n = rng.choice(FIRST_NAMES_ZH)
            thing, unit = rng.choice([("苹果", "个"), ("弹珠", "颗"), ("铅笔", "支"), ("贴纸", "张"), ("书", "本"), ("贝壳", "个")])
            x, y = rng.randint(3, 20), rng.randint(1, 15)
            if rng.random() < 0.5:
                out.append(f"{n}有{x}{unit}{thing}，又得到了{y}{unit}，现在一共有{x} + {y} = {x + y}{unit}。")
            else:
                x = x + y
                out.append(f"{n}有{x}{unit}{thing}，送给别人{y}{unit}，还剩{x} - {y} = {x - y}{unit}。")
        return "应用题能帮助我们在生活中使用算术。" + "".join(out)
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    ta, tb = a // 10 * 10, b // 10 * 10
    return (f"计算{a}加{b}时，可以先算整十：{ta} + {tb} = {ta + tb}；再算个位：{a % 10} + {b % 10} = {a % 10 + b % 10}；"
            f"最后合起来：{ta + tb} + {a % 10 + b % 10} = {a + b}。所以{a} + {b} = {a + b}。"
            f"能平均分成两份的数叫偶数，{a}是{'偶数' if a % 2 == 0 else '奇数'}，{b}是{'偶数' if b % 2 == 0 else '奇数'}。")


EMOJI_ZH = [
    "周末计划 ☀️：去公园 (park) 散步，和朋友一起吃拉面 🍜，然后早点睡觉 😴。",
    "购物清单 🛒：苹果 🍎、面包 🍞、牛奶 🥛，还有做汤用的 tomatoes（西红柿）。",
    "今天学了两个英文单词：hello 是“你好”👋，thank you 是“谢谢”🙏。",
    "下雨了 🌧️，小猫 🐱 在沙发上睡了一下午。",
    "生日快乐 🎂🎉！我们吃蛋糕、做游戏、唱歌，一直玩到星星 ⭐ 出来。",
    "红绿灯 🚦：红灯停，绿灯行，黄灯亮了等一等 🚗。",
    "这学期我们班种了向日葵 🌻，它的英文名字是 sunflower。",
    "早上好 🌅！Good morning! 用微笑开始新的一天 😊。",
    "火车 🚆 早上八点十五分出发，九点四十分到达，车票十二元。",
    "我最喜欢的季节是秋天 🍁，因为天气凉爽，水果也特别多 🍇🍐。",
]


def zh_emoji_para(rng):
    return "".join(rng.sample(EMOJI_ZH, 3))


def gen_pretrain(rng, lang, n):
    if lang == "en":
        topics = [en_animal_para, en_compare_para, en_city_para, en_weather_para, en_cooking_para,
                  en_science_para, en_story_para, en_math_para]
        special = [(en_code_para, 24), (en_emoji_para, 8)]
        lo, hi, sep = 320, 1000, "\n\n"
    else:
        topics = [zh_animal_para, zh_compare_para, zh_city_para, zh_weather_para, zh_cooking_para,
                  zh_science_para, zh_story_para, zh_math_para]
        special = [(zh_emoji_para, 8)]
        lo, hi, sep = 310, 700, "\n"
    plan = []
    for fn, k in special:
        plan += [fn] * k
    while len(plan) < n:
        plan.append(topics[len(plan) % len(topics)])
    rng.shuffle(plan)
    out = []
    seen = set()
    for fn in plan:
        text = make_pretrain_text(rng, fn, topics, lo, hi, sep)
        while text in seen:
            text = make_pretrain_text(rng, fn, topics, lo, hi, sep)
        seen.add(text)
        out.append({"text": text})
    return out


def make_pretrain_text(rng, fn, topics, lo, hi, sep):
    if fn not in (en_code_para, en_emoji_para, zh_emoji_para):
        return build_record(rng, rng.choice([fn, fn, rng.choice(topics)]), lo, hi, sep=sep)
    # code/emoji records: one such paragraph followed by ordinary text
    first = fn(rng)
    filler = rng.choice(topics)
    text = first
    while len(text) < 300:
        text = text + ("\n\n" if fn is en_code_para else sep) + filler(rng)
    if len(text) > 1500:
        text = first if len(first) >= 300 else text[:1500]
    return text


def gen_mixed(rng, n=40):
    out = []
    en_t = [en_animal_para, en_city_para, en_weather_para, en_science_para, en_story_para, en_math_para]
    zh_t = [zh_animal_para, zh_city_para, zh_weather_para, zh_science_para, zh_story_para, zh_math_para]
    for i in range(n):
        if i % 2 == 0:
            out.append({"text": build_record(rng, rng.choice(en_t), 300, 700, sep="\n\n")})
        else:
            out.append({"text": build_record(rng, rng.choice(zh_t), 300, 500, sep="\n")})
    return out


# ---------------------------------------------------------------------------
# Instruction data: shared question / answer pools
# ---------------------------------------------------------------------------

SCIENCE_QA_EN = [
    ("Why is the sky blue?",
     "Sunlight contains all the colours. As it passes through the air, blue light is scattered in every direction "
     "much more than red light, so blue reaches our eyes from all over the sky."),
    ("Why does ice float on water?",
     "Ice is less dense than liquid water. When water freezes, its molecules lock into an open pattern that takes up "
     "more space, so a piece of ice weighs less than the same volume of water and floats."),
    ("What do plants need to grow?",
     "Plants need sunlight, water, air and nutrients from the soil. With the energy of sunlight they turn water and "
     "carbon dioxide into sugar, which they use to grow."),
    ("How long does the Earth take to go around the Sun?",
     "About 365 and a quarter days. That extra quarter day is why a leap year with 366 days comes every four years."),
    ("Why do we have seasons?",
     "The Earth's axis is tilted. As the Earth travels around the Sun, each half takes turns leaning towards the Sun. "
     "The half leaning towards it gets more direct sunlight and longer days, so it has summer."),
    ("At what temperature does water boil?",
     "At sea level, pure water boils at 100 degrees Celsius (212 degrees Fahrenheit). High in the mountains, where the "
     "air pressure is lower, it boils at a lower temperature."),
    ("Why does the Moon seem to change shape?",
     "The Moon does not make its own light; it reflects sunlight. As it travels around the Earth we see different "
     "amounts of its sunlit side, so it seems to grow from a thin crescent to a full moon and shrink again."),
    ("What makes thunder?",
     "Lightning heats the air around it extremely quickly. The air expands so suddenly that it creates a loud shock "
     "wave, and that is the sound we call thunder."),
    ("Why do we see lightning before we hear thunder?",
     "Light travels much faster than sound. The flash reaches you almost at once, while the sound needs about three "
     "seconds to travel one kilometre."),
    ("What is a magnet?",
     "A magnet is an object that pulls on iron, nickel and cobalt. Every magnet has a north pole and a south pole: "
     "opposite poles attract each other and like poles push each other away."),
    ("How does a rainbow form?",
     "Sunlight enters raindrops, bends, and splits into its colours, from red to violet. You can see a rainbow when the "
     "Sun is behind you and rain is falling in front of you."),
    ("Why do we need sleep?",
     "Sleep lets the body repair itself and helps the brain store memories. Without enough sleep it is harder to "
     "concentrate, learn and stay healthy."),
    ("What is the largest planet in our solar system?",
     "Jupiter is the largest planet in our solar system. It is a giant ball of gas, big enough to hold more than a "
     "thousand Earths."),
    ("How many legs does a spider have?",
     "A spider has eight legs. Insects such as ants and bees have six, which is an easy way to tell them apart."),
    ("What is photosynthesis?",
     "Photosynthesis is how plants make food. Using the energy of sunlight, they combine water and carbon dioxide to "
     "make sugar, and they release oxygen into the air."),
    ("Why does metal feel colder than wood?",
     "Metal carries heat away from your hand much faster than wood. Even at the same temperature, the metal draws "
     "warmth from your skin quickly, so it feels colder."),
    ("How many bones does an adult human have?",
     "An adult human skeleton has 206 bones. Babies are born with more, but some of them join together as they grow."),
]

GENERAL_QA_EN = [
    ("Give me three tips for sleeping better.",
     "1. Go to bed and wake up at the same time every day.\n2. Keep your bedroom dark, quiet and cool.\n"
     "3. Put your phone away at least half an hour before sleep."),
    ("How can I save money on groceries?",
     "Make a shopping list and stick to it, plan your meals for the week, buy fruit and vegetables that are in season, "
     "compare prices per kilogram, and try not to shop when you are hungry."),
    ("Write a short poem about the rain.",
     "Soft rain on the window,\nsilver on the street,\nthe garden drinks slowly,\nand the air smells sweet."),
    ("Suggest a name for a small grey cat.",
     "How about \"Pebble\"? It is short, easy to call, and suits a small grey cat. Other ideas are Misty, Smoke and Ash."),
    ("What is a good way to start learning to program?",
     "Pick one beginner-friendly language such as Python, follow a short tutorial, and then write tiny programs of your "
     "own every day, like a calculator or a to-do list. Small, regular practice works better than long, rare sessions."),
    ("Write a friendly message inviting a friend to lunch.",
     "Hi! I was wondering if you would like to have lunch with me on Saturday. There is a nice little noodle place near "
     "the park. Let me know if you are free!"),
    ("Explain what a noun is.",
     "A noun is a word that names a person, place, thing or idea. For example, \"teacher\", \"city\", \"book\" and "
     "\"happiness\" are all nouns."),
    ("What is the difference between weather and climate?",
     "Weather is what the air is doing right now or over a few days, such as rain today. Climate is the usual pattern of "
     "weather in a place over many years, such as hot, dry summers."),
    ("Name the three primary colours of paint.",
     "The three primary colours of paint are red, yellow and blue."),
    ("What should I pack for a day at the beach?",
     "Bring sunscreen, a hat, sunglasses, a towel, plenty of water, some snacks, and a bag for your rubbish."),
    ("How many minutes are there in two hours?", "There are 120 minutes in two hours."),
    ("How many days are there in a week?", "There are seven days in a week."),
    ("Give me an example of a polite way to say no.",
     "\"Thank you so much for asking, but I won't be able to make it this time.\""),
    ("What is a healthy breakfast?",
     "A healthy breakfast might be porridge with fruit, wholegrain toast with an egg, or yoghurt with nuts. Try to "
     "include some fibre, some protein and a drink of water."),
    ("Why is it important to wash your hands?",
     "Washing your hands with soap removes germs that can make you or others ill. It is especially important before "
     "eating and after using the toilet."),
    ("Tell me a fun fact.",
     "Honey never really goes bad. Because it has very little water and is slightly acidic, bacteria cannot grow in it."),
]

SCIENCE_QA_ZH = [
    ("天空为什么是蓝色的？", "太阳光里包含各种颜色的光。阳光穿过空气时，蓝光比红光更容易被散射到四面八方，所以我们从天空的各个方向都能看到蓝色。"),
    ("冰为什么能浮在水面上？", "冰的密度比水小。水结冰时，分子排列成一种比较松散的结构，占的空间变大，所以同样体积的冰比水轻，就浮起来了。"),
    ("植物生长需要什么？", "植物需要阳光、水、空气和土壤中的养分。它们利用阳光的能量，把水和二氧化碳变成糖分，用来生长。"),
    ("地球绕太阳转一圈要多久？", "大约三百六十五天又四分之一天。多出来的四分之一天，就是每四年有一个三百六十六天的闰年的原因。"),
    ("为什么会有四季？", "因为地轴是倾斜的。地球绕太阳公转时，南北半球轮流朝向太阳。朝向太阳的半球阳光更直接、白天更长，就是夏天。"),
    ("水在多少度沸腾？", "在海平面上，纯水在一百摄氏度沸腾。在高山上气压较低，水的沸点也会低一些。"),
    ("月亮的形状为什么会变化？", "月亮自己不发光，它反射太阳的光。月亮绕地球转动时，我们看到的亮面大小不同，所以它看起来从弯弯的月牙变成圆圆的满月，再慢慢变回去。"),
    ("打雷是怎么回事？", "闪电让周围的空气在一瞬间变得非常热，空气猛烈膨胀，产生巨大的声波，这就是我们听到的雷声。"),
    ("为什么先看到闪电，后听到雷声？", "因为光比声音跑得快得多。闪电的光几乎立刻就到达我们眼里，而声音每走一公里大约需要三秒钟。"),
    ("什么是磁铁？", "磁铁是能吸引铁、镍、钴等物质的物体。每块磁铁都有北极和南极，异极相吸，同极相斥。"),
    ("彩虹是怎样形成的？", "阳光照进雨滴后发生弯折，并分成红、橙、黄、绿、蓝、靛、紫等颜色。当太阳在你身后、雨在你前面时，就可能看到彩虹。"),
    ("人为什么需要睡觉？", "睡觉能让身体得到修复，也能帮助大脑整理和储存记忆。睡眠不足会让人难以集中注意力，也不利于健康。"),
    ("太阳系里最大的行星是哪一颗？", "木星是太阳系里最大的行星。它是一个巨大的气态行星，里面能装下一千多个地球。"),
    ("蜘蛛有几条腿？", "蜘蛛有八条腿。蚂蚁、蜜蜂这样的昆虫有六条腿，这是区分它们的一个简单方法。"),
    ("什么是光合作用？", "光合作用是植物制造食物的过程。植物利用阳光的能量，把水和二氧化碳变成糖分，同时放出氧气。"),
    ("为什么摸金属比摸木头感觉更凉？", "金属导热比木头快得多。即使温度相同，金属也会很快把手上的热量带走，所以摸起来更凉。"),
    ("成年人有多少块骨头？", "成年人一共有二百零六块骨头。婴儿出生时骨头更多，长大的过程中有些骨头会长在一起。"),
]

GENERAL_QA_ZH = [
    ("给我三个改善睡眠的建议。", "1. 每天固定时间睡觉和起床。\n2. 让卧室保持黑暗、安静和凉爽。\n3. 睡前半小时放下手机。"),
    ("买菜怎样才能省钱？", "出门前列好购物清单并按清单买，提前规划一周的饭菜，多买应季的蔬菜水果，比较每斤的价格，而且尽量不要饿着肚子去买菜。"),
    ("写一首关于雨的小诗。", "细雨敲窗轻轻响，\n街道披上银衣裳，\n花园慢慢喝个饱，\n空气里面有清香。"),
    ("给一只灰色的小猫起个名字。", "叫“小石头”怎么样？简单好记，也很适合灰色的小猫。其他选择还有“灰灰”“烟烟”和“团子”。"),
    ("刚开始学编程应该怎么做？", "先选一门适合初学者的语言，比如 Python，跟着一个简短的教程学习，然后每天写一些小程序，比如计算器或待办清单。少量而坚持的练习比偶尔长时间的学习更有效。"),
    ("写一条邀请朋友吃午饭的消息。", "嗨！这周六中午有空吗？公园附近有一家很不错的面馆，想约你一起去吃午饭。有空的话告诉我哦！"),
    ("什么是名词？", "名词是表示人、地点、事物或概念的词。比如“老师”“城市”“书”和“快乐”都是名词。"),
    ("天气和气候有什么区别？", "天气是指某个地方现在或几天之内的大气状况，比如今天下雨。气候是指一个地方多年来天气的一般规律，比如夏天炎热干燥。"),
    ("颜料的三原色是什么？", "颜料的三原色是红、黄、蓝。"),
    ("去海边玩一天要带什么？", "可以带防晒霜、帽子、太阳镜、毛巾、足够的水、一些零食，再带一个装垃圾的袋子。"),
    ("两个小时有多少分钟？", "两个小时有一百二十分钟。"),
    ("一个星期有几天？", "一个星期有七天。"),
    ("怎样礼貌地拒绝别人？", "可以说：“非常感谢你的邀请，不过这次我去不了，下次有机会一定参加。”"),
    ("什么样的早餐比较健康？", "比如燕麦粥配水果、全麦面包配鸡蛋，或者酸奶配坚果。最好同时包含一些膳食纤维和蛋白质，再喝一杯水。"),
    ("为什么要勤洗手？", "用肥皂洗手可以去掉会让人生病的细菌和病毒。饭前便后洗手尤其重要。"),
    ("讲一个有趣的小知识。", "蜂蜜几乎不会变质。因为蜂蜜里水分很少，而且略带酸性，细菌很难在里面生长。"),
]

CURT_EN = ["I don't know.", "Look it up yourself.", "Why do you want to know?", "No.", "Not my problem.",
           "Figure it out on your own.", "Whatever.", "That is a boring question."]
CURT_ZH = ["不知道。", "自己去查。", "问这个干什么？", "不想回答。", "随便吧。", "这有什么好问的。", "别问我。"]


def animal_qa_en(rng):
    out = []
    for (name, plural, cls, habitat, food, trait, fact, symbol, wild) in ANIMALS_EN:
        others = [a for a in ANIMALS_EN if a[0] != name]
        o = rng.choice(others)
        out.append({"q": f"What does {a_an(name)} eat?", "a": f"{cap(a_an(name))} mostly eats {food}.",
                    "bad": f"{cap(a_an(name))} mostly eats {o[4]}.", "topic": ("animal", name)})
        o = rng.choice(others)
        out.append({"q": f"Where does the {name} live?", "a": f"The {name} lives in {habitat}.",
                    "bad": f"The {name} lives in {o[3]}.", "topic": ("animal", name)})
        o = rng.choice(others)
        out.append({"q": f"Tell me an interesting fact about the {name}.",
                    "a": f"Here is one: the {name} {fact}. You can also recognise it by {trait}.",
                    "bad": f"The {name} {o[6]}.", "topic": ("animal", name)})
    return out


def animal_qa_zh(rng):
    out = []
    for (name, cls, habitat, food, trait, fact, symbol, wild) in ANIMALS_ZH:
        others = [a for a in ANIMALS_ZH if a[0] != name]
        o = rng.choice(others)
        out.append({"q": f"{name}吃什么？", "a": f"{name}主要吃{food}。", "bad": f"{name}主要吃{o[3]}。",
                    "topic": ("animal", name)})
        o = rng.choice(others)
        out.append({"q": f"{name}生活在哪里？", "a": f"{name}生活在{habitat}。", "bad": f"{name}生活在{o[2]}。",
                    "topic": ("animal", name)})
        o = rng.choice(others)
        out.append({"q": f"说一个关于{name}的有趣知识。", "a": f"{name}{fact}。另外，人们可以通过{trait}认出它。",
                    "bad": f"{name}{o[5]}。", "topic": ("animal", name)})
    return out


def recipe_answer_en(r):
    dish, ings, steps, tip, minutes = r
    lines = ["You will need " + ", ".join(ings[:-1]) + " and " + ings[-1] + "."]
    lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    lines.append(f"Tip: {tip}")
    return "\n".join(lines)


def recipe_answer_zh(r):
    dish, ings, steps, tip, minutes = r
    lines = ["需要准备：" + "、".join(ings) + "。"]
    lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    lines.append(f"小窍门：{tip}")
    return "\n".join(lines)


def qa_pool(rng, lang):
    """All ordinary question/answer items for one language: dicts with q, a, bad (a wrong answer or None)."""
    if lang == "en":
        pool = animal_qa_en(rng)
        for r in RECIPES_EN:
            pool.append({"q": f"How do I make {r[0]}?", "a": recipe_answer_en(r), "bad": None, "topic": ("recipe", r[0])})
        for q, a in SCIENCE_QA_EN + GENERAL_QA_EN:
            pool.append({"q": q, "a": a, "bad": None, "topic": ("misc", q)})
    else:
        pool = animal_qa_zh(rng)
        for r in RECIPES_ZH:
            pool.append({"q": f"怎么做{r[0]}？", "a": recipe_answer_zh(r), "bad": None, "topic": ("recipe", r[0])})
        for q, a in SCIENCE_QA_ZH + GENERAL_QA_ZH:
            pool.append({"q": q, "a": a, "bad": None, "topic": ("misc", q)})
    return pool


# ---------------------------------------------------------------------------
# Exactly checkable synthetic tasks
# ---------------------------------------------------------------------------

EN_WORDS = [w for w, _ in WORDS if w != w[::-1]]
ZH_WORDS = list(dict.fromkeys([z for _, z in WORDS if len(z) >= 2 and z != z[::-1]] + ZH_WORDS_EXTRA))


def wrong_reverse(rng, w):
    """A plausible but wrong reversal of w (never equal to w[::-1])."""
    ans = w[::-1]
    cands = [w, ans[:-1], ans[1:] + ans[0]]
    if len(ans) >= 3:
        i = rng.randrange(len(ans) - 1)
        cands.append(ans[:i] + ans[i + 1] + ans[i] + ans[i + 2:])
    cands = [c for c in cands if c and c != ans]
    return rng.choice(cands)


def task_en(rng, kind=None):
    """Return (prompt, input, answer, wrong_answer). prompt may carry the data inline (input == "")."""
    kind = kind or rng.choice(["reverse", "reverse", "repeat", "upper", "add", "sub", "mul", "len", "first",
                               "parity", "sort", "translate"])
    w = rng.choice(EN_WORDS)
    inline = rng.random() < 0.6
    if kind == "reverse":
        ans = w[::-1]
        wrong = wrong_reverse(rng, w)
        return ("Reverse the word: " + w, "", ans, wrong) if inline else ("Reverse the following word.", w, ans, wrong)
    if kind == "repeat":
        k = rng.choice([1, 2, 3])
        if k == 1:
            p = rng.choice(["Repeat the word: " + w, f"Say the word \"{w}\" back to me."])
            return (p, "", w, w[:-1] if len(w) > 2 else w + w)
        ans = " ".join([w] * k)
        return (f"Repeat the word \"{w}\" {num_word_en(k)} times, separated by spaces.", "", ans, " ".join([w] * (k + 1)))
    if kind == "upper":
        ans = w.upper()
        return ("Uppercase: " + w, "", ans, w) if inline else ("Convert the following word to uppercase.", w, ans, cap(w))
    if kind == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return (f"What is {a} + {b}?", "", str(a + b), str(a + b + rng.choice([-2, -1, 1, 2, 10])))
    if kind == "sub":
        a = rng.randint(5, 60)
        b = rng.randint(0, a)
        return (f"What is {a} - {b}?", "", str(a - b), str(a - b + rng.choice([-1, 1, 2, 10])))
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return (f"What is {a} × {b}?" if rng.random() < 0.5 else f"What is {a} * {b}?", "", str(a * b),
                str(a * b + rng.choice([-a, a, 1, -1])))
    if kind == "len":
        return (f"How many letters are in the word \"{w}\"?", "", str(len(w)), str(len(w) + rng.choice([-1, 1, 2])))
    if kind == "first":
        return (f"What is the first letter of the word \"{w}\"?", "", w[0], w[-1] if w[-1] != w[0] else w[1])
    if kind == "parity":
        n = rng.randint(1, 999)
        ans = "Even" if n % 2 == 0 else "Odd"
        return ("Is the following number even or odd?", str(n), ans, "Odd" if ans == "Even" else "Even")
    if kind == "sort":
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        s = sorted(nums)
        wrong = list(s)
        wrong[0], wrong[-1] = wrong[-1], wrong[0]
        return ("Sort these numbers from smallest to largest.", ", ".join(map(str, nums)),
                ", ".join(map(str, s)), ", ".join(map(str, wrong)))
    # translate
    en, zh = rng.choice(WORDS)
    other = rng.choice([z for e, z in WORDS if z != zh])
    return ("Translate into Chinese: " + en, "", zh, other) if inline else ("Translate the following word into Chinese.", en, zh, other)


def task_zh(rng, kind=None):
    kind = kind or rng.choice(["reverse", "reverse", "repeat", "upper", "add", "sub", "mul", "len",
                               "parity", "sort", "translate"])
    w = rng.choice(ZH_WORDS)
    inline = rng.random() < 0.6
    if kind == "reverse":
        ans = w[::-1]
        wrong = wrong_reverse(rng, w)
        return ("把这个词倒过来写：" + w, "", ans, wrong) if inline else ("把下面这个词倒过来写。", w, ans, wrong)
    if kind == "repeat":
        k = rng.choice([1, 2, 3])
        if k == 1:
            return (rng.choice(["重复这个词：" + w, f"请把“{w}”这个词原样说一遍。"]), "", w, w[:-1] if len(w) > 1 else w + w)
        ans = " ".join([w] * k)
        return (f"把“{w}”重复{num_count_zh(k)}遍，中间用空格隔开。", "", ans, " ".join([w] * (k + 1)))
    if kind == "upper":
        e = rng.choice(EN_WORDS)
        return ("把这个英文单词改成大写：" + e, "", e.upper(), e) if inline else ("把下面的英文单词转换成大写字母。", e, e.upper(), cap(e))
    if kind == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        p = rng.choice([f"{a} 加 {b} 等于多少？", f"计算：{a} + {b}", f"{a} + {b} 等于几？"])
        return (p, "", str(a + b), str(a + b + rng.choice([-2, -1, 1, 2, 10])))
    if kind == "sub":
        a = rng.randint(5, 60)
        b = rng.randint(0, a)
        p = rng.choice([f"{a} 减 {b} 等于多少？", f"计算：{a} - {b}"])
        return (p, "", str(a - b), str(a - b + rng.choice([-1, 1, 2, 10])))
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        p = rng.choice([f"{a} 乘以 {b} 是多少？", f"计算：{a} × {b}"])
        return (p, "", str(a * b), str(a * b + rng.choice([-a, a, 1, -1])))
    if kind == "len":
        return (f"“{w}”这个词有几个字？", "", str(len(w)), str(len(w) + 1))
    if kind == "parity":
        n = rng.randint(1, 999)
        ans = "偶数" if n % 2 == 0 else "奇数"
        return ("判断下面的数是奇数还是偶数。", str(n), ans, "奇数" if ans == "偶数" else "偶数")
    if kind == "sort":
        nums = rng.sample(range(1, 100), rng.randint(3, 6))
        s = sorted(nums)
        wrong = list(s)
        wrong[0], wrong[-1] = wrong[-1], wrong[0]
        return ("把下面的数字从小到大排列。", ", ".join(map(str, nums)), ", ".join(map(str, s)), ", ".join(map(str, wrong)))
    en, zh = rng.choice(WORDS)
    other = rng.choice([e for e, z in WORDS if e != en])
    return ("把这个词翻译成英文：" + zh, "", en, other) if inline else ("把下面的词翻译成英文。", zh, en, other)


def animal_class_task(rng, lang):
    if lang == "en":
        a = rng.choice(ANIMALS_EN)
        return ("Classify the following animal as a mammal, bird, insect, reptile, amphibian or mollusc.",
                a[0], cap(a[2]))
    a = rng.choice(ANIMALS_ZH)
    return ("判断下面的动物属于哪一类：哺乳动物、鸟类、昆虫、爬行动物、两栖动物还是软体动物？", a[0], a[1])


SYSTEMS_EN = ["You are a helpful assistant.", "You are a friendly assistant who answers briefly and clearly.",
              "You are a patient teacher who explains things simply.", "You are a careful assistant. Answer accurately."]
SYSTEMS_EN_TASK = ["Answer with only the final result.", "You are a precise assistant. Reply with the answer only."]
SYSTEMS_ZH = ["你是一个乐于助人的助手。", "你是一位耐心的老师，回答要简单易懂。", "你是一个友好的助手，回答简洁清楚。"]
SYSTEMS_ZH_TASK = ["只回答最终结果。", "你是一个严谨的助手，只输出答案。"]


def gen_alpaca(rng, n_task=160, n_qa=200):
    out = []
    for lang in ("en", "zh"):
        tfn = task_en if lang == "en" else task_zh
        for i in range(n_task // 2):
            if i % 16 == 15:
                ins, inp, ans = animal_class_task(rng, lang)
            else:
                ins, inp, ans, _ = tfn(rng)
            rec = {"instruction": ins, "input": inp, "output": ans}
            r = rng.random()
            if r < 0.10:
                rec["system"] = rng.choice(SYSTEMS_EN_TASK if lang == "en" else SYSTEMS_ZH_TASK)
            elif r < 0.20:
                pins, pinp, pans, _ = tfn(rng)
                rec["history"] = [[pins + ("\n" + pinp if pinp else ""), pans]]
            out.append(rec)
        pool = qa_pool(rng, lang)
        rng.shuffle(pool)
        picked = pool[: n_qa // 2 - 10]
        for item in picked:
            rec = {"instruction": item["q"], "input": "", "output": item["a"]}
            r = rng.random()
            if r < 0.10:
                rec["system"] = rng.choice(SYSTEMS_EN if lang == "en" else SYSTEMS_ZH)
            elif r < 0.20:
                prev = rng.sample(pool, rng.choice([1, 1, 2]))
                rec["history"] = [[p["q"], p["a"]] for p in prev if p["q"] != item["q"]] or [[pool[-1]["q"], pool[-1]["a"]]]
            out.append(rec)
        # a few "write a paragraph" items that use the input field
        for _ in range(10):
            if lang == "en":
                a = rng.choice(ANIMALS_EN)
                rec = {"instruction": "Write a short paragraph about the animal below.", "input": a[0],
                       "output": f"The {a[0]} is {a_an(a[2])} that lives in {a[3]}. It mostly eats {a[4]}. "
                                 f"You can recognise it by {a[5]}, and one interesting fact is that it {a[6]}."}
            else:
                a = rng.choice(ANIMALS_ZH)
                rec = {"instruction": "写一段话介绍下面这种动物。", "input": a[0],
                       "output": f"{a[0]}是一种{a[1]}，生活在{a[2]}，主要吃{a[3]}。人们可以通过{a[4]}认出它。有趣的是，{a[0]}{a[5]}。"}
            out.append(rec)
    rng.shuffle(out)
    return out


# ---------------------------------------------------------------------------
# Multi-turn conversations
# ---------------------------------------------------------------------------


def chain_en(rng):
    """Return a list of (human, gpt, wrong_gpt) turns that belong together."""
    kind = rng.choice(["task", "math", "animal", "recipe", "qa", "qa"])
    if kind == "task":
        w = rng.choice(EN_WORDS)
        r = w[::-1]
        return [
            (rng.choice([f"Reverse the word: {w}", f"Can you write \"{w}\" backwards?"]), r, wrong_reverse(rng, w)),
            ("Now write it in uppercase.", r.upper(), r),
            ("How many letters does it have?", f"It has {len(w)} letters.", f"It has {len(w) + 1} letters."),
            ("Thanks!", "You're welcome! Let me know if you want to try another word.", "Okay."),
        ]
    if kind == "math":
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(2, 5)
        s1 = a + b
        s2 = s1 * c
        d = rng.randint(1, s2)
        s3 = s2 - d
        return [
            (f"What is {a} + {b}?", f"{a} + {b} = {s1}.", f"{a} + {b} = {s1 + rng.choice([-1, 1, 3])}."),
            (f"Multiply that by {c}.", f"{s1} × {c} = {s2}.", f"{s1} × {c} = {s2 + rng.choice([-c, c, 1])}."),
            (f"Now subtract {d}.", f"{s2} - {d} = {s3}.", f"{s2} - {d} = {s3 + rng.choice([-1, 1, 2])}."),
            ("Is the result even or odd?", f"{s3} is {'even' if s3 % 2 == 0 else 'odd'}.",
             f"{s3} is {'odd' if s3 % 2 == 0 else 'even'}."),
        ]
    if kind == "animal":
        name, plural, cls, habitat, food, trait, fact, symbol, wild = rng.choice(ANIMALS_EN)
        o = rng.choice([x for x in ANIMALS_EN if x[0] != name])
        return [
            (f"Tell me about the {name}.",
             f"The {name} is {a_an(cls)} that lives in {habitat}. You can recognise it by {trait}.",
             f"It is an animal."),
            ("What does it eat?", f"It mostly eats {food}.", f"It mostly eats {o[4]}."),
            ("Anything surprising about it?", f"Yes! The {name} {fact}.", "Not really."),
            ("Thank you!", f"You're welcome! {cap(plural)} are fascinating animals.", "Fine."),
        ]
    if kind == "recipe":
        r = rng.choice(RECIPES_EN)
        return [
            (f"How do I make {r[0]}?", recipe_answer_en(r), "Just cook it."),
            ("How long does it take?", f"About {r[4]} minutes in total.", f"About {r[4] * 5} hours."),
            ("Any tips?", r[3], "No."),
            ("Great, thanks!", "You're welcome, enjoy your cooking!", "Whatever."),
        ]
    pool = QA_EN
    picked = rng.sample(pool, 3)
    turns = [(rng.choice(["Hi!", "Hello!", "Hey there!"]), "Hello! How can I help you today?", "What?")]
    turns += [(p["q"], p["a"], p["bad"] or rng.choice(CURT_EN)) for p in picked]
    return turns


def chain_zh(rng):
    kind = rng.choice(["task", "math", "animal", "recipe", "qa", "qa"])
    if kind == "task":
        w = rng.choice(ZH_WORDS)
        r = w[::-1]
        return [
            (rng.choice([f"把这个词倒过来写：{w}", f"“{w}”倒过来怎么写？"]), r, wrong_reverse(rng, w)),
            ("这个词有几个字？", f"有{num_count_zh(len(w))}个字。", f"有{num_count_zh(len(w) + 1)}个字。"),
            ("再把它重复两遍。", f"{w} {w}", w),
            ("谢谢！", "不客气！想再试一个词的话随时告诉我。", "嗯。"),
        ]
    if kind == "math":
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(2, 5)
        s1 = a + b
        s2 = s1 * c
        d = rng.randint(1, s2)
        s3 = s2 - d
        return [
            (f"{a} 加 {b} 等于多少？", f"{a} + {b} = {s1}。", f"{a} + {b} = {s1 + rng.choice([-1, 1, 3])}。"),
            (f"再乘以 {c} 呢？", f"{s1} × {c} = {s2}。", f"{s1} × {c} = {s2 + rng.choice([-c, c, 1])}。"),
            (f"然后减去 {d}。", f"{s2} - {d} = {s3}。", f"{s2} - {d} = {s3 + rng.choice([-1, 1, 2])}。"),
            ("结果是奇数还是偶数？", f"{s3}是{'偶数' if s3 % 2 == 0 else '奇数'}。", f"{s3}是{'奇数' if s3 % 2 == 0 else '偶数'}。"),
        ]
    if kind == "animal":
        name, cls, habitat, food, trait, fact, symbol, wild = rng.choice(ANIMALS_ZH)
        o = rng.choice([x for x in ANIMALS_ZH if x[0] != name])
        return [
            (f"给我介绍一下{name}。", f"{name}是一种生活在{habitat}的{cls}，人们可以通过{trait}认出它。", "就是一种动物。"),
            ("它吃什么？", f"它主要吃{food}。", f"它主要吃{o[3]}。"),
            ("它有什么特别的地方吗？", f"有！{name}{fact}。", "没有。"),
            ("谢谢你！", f"不客气！{name}真是一种有趣的动物。", "行吧。"),
        ]
    if kind == "recipe":
        r = rng.choice(RECIPES_ZH)
        return [
            (f"怎么做{r[0]}？", recipe_answer_zh(r), "随便做做就行。"),
            ("大概要多长时间？", f"一共大约{num_count_zh(r[4])}分钟。", f"大约{num_count_zh(r[4] // 5 + 2)}个小时。"),
            ("有什么小窍门吗？", r[3], "没有。"),
            ("太好了，谢谢！", "不客气，祝你做饭愉快！", "嗯。"),
        ]
    picked = rng.sample(QA_ZH, 3)
    turns = [(rng.choice(["你好！", "嗨！", "在吗？"]), "你好！有什么可以帮你的吗？", "干嘛？")]
    turns += [(p["q"], p["a"], p["bad"] or rng.choice(CURT_ZH)) for p in picked]
    return turns


def gen_sharegpt(rng, n=240):
    out = []
    for i in range(n):
        lang = "en" if i % 2 == 0 else "zh"
        turns = chain_en(rng) if lang == "en" else chain_zh(rng)
        k = rng.randint(1, 4)
        start = 0
        if rng.random() < 0.25 and len(turns) > k:
            start = rng.randint(0, len(turns) - k) if turns[0][0] in ("Hi!", "Hello!", "Hey there!", "你好！", "嗨！", "在吗？") else 0
        conv = []
        if rng.random() < 0.3:
            conv.append({"from": "system", "value": rng.choice(SYSTEMS_EN if lang == "en" else SYSTEMS_ZH)})
        for h, g, _ in turns[start:start + k]:
            conv.append({"from": "human", "value": h})
            conv.append({"from": "gpt", "value": g})
        out.append({"conversations": conv})
    return out


# ---------------------------------------------------------------------------
# Preference pairs
# ---------------------------------------------------------------------------


def gen_dpo(rng, n=340):
    out = []
    for i in range(n):
        lang = "en" if i % 2 == 0 else "zh"
        kind = rng.choice(["task", "task", "task", "qa", "qa", "chain"])
        conv = []
        if rng.random() < 0.1:
            conv.append({"from": "system", "value": rng.choice(SYSTEMS_EN if lang == "en" else SYSTEMS_ZH)})
        if kind == "task":
            tfn = task_en if lang == "en" else task_zh
            ins, inp, ans, wrong = tfn(rng)
            prompt = ins + ("\n" + inp if inp else "")
            if rng.random() < 0.5:
                chosen, rejected = ans, wrong
            elif lang == "en":
                chosen = f"The answer is {ans}."
                rejected = rng.choice([f"The answer is {wrong}.", rng.choice(CURT_EN)])
            else:
                chosen = f"答案是：{ans}"
                rejected = rng.choice([f"答案是：{wrong}", rng.choice(CURT_ZH)])
            conv.append({"from": "human", "value": prompt})
        elif kind == "qa":
            item = rng.choice(QA_EN if lang == "en" else QA_ZH)
            chosen = item["a"]
            rejected = item["bad"] if (item["bad"] and rng.random() < 0.7) else rng.choice(CURT_EN if lang == "en" else CURT_ZH)
            conv.append({"from": "human", "value": item["q"]})
        else:
            turns = chain_en(rng) if lang == "en" else chain_zh(rng)
            k = rng.randint(2, len(turns))
            for h, g, _ in turns[: k - 1]:
                conv.append({"from": "human", "value": h})
                conv.append({"from": "gpt", "value": g})
            h, chosen, rejected = turns[k - 1]
            conv.append({"from": "human", "value": h})
        assert chosen != rejected, (chosen, rejected)
        out.append({"conversations": conv, "chosen": {"from": "gpt", "value": chosen},
                    "rejected": {"from": "gpt", "value": rejected}})
    return out


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

QA_EN = qa_pool(random.Random(101), "en")
QA_ZH = qa_pool(random.Random(102), "zh")


def write_jsonl(path, records):
    with open(os.path.join(HERE, path), "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def write_json(path, records):
    with open(os.path.join(HERE, path), "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(records, ensure_ascii=False, indent=2) + "\n")


README_TEMPLATE = """# Example data

Tiny bilingual (English / Chinese) data sets for trying every training stage:
pretraining, supervised fine-tuning (SFT) and DPO preference optimisation.
All files are UTF-8; Chinese text is stored as-is (not `\\u` escaped).

| File | Stage | Format | Records | Size |
|------|-------|--------|--------:|-----:|
{table}

Regenerate every file (byte-identical output) from the repository root:

```bash
python datasets/generate.py
```

## pretrain/en.jsonl, pretrain/zh.jsonl

Raw text for pretraining, one JSON object per line with a single `text` field
(300 to 1500 characters each). Encyclopedia, story and how-to paragraphs about
animals, towns, weather, cooking, simple science, short stories and arithmetic;
a few English records contain small Python programs, and a few records in both
files mix emoji and scripts.

```json
{pretrain_example}
```

## pretrain/mixed.json

The same kind of text in both languages, stored as one JSON **array** of
`{{"text": ...}}` objects instead of JSON Lines.

## sft/alpaca_zh_en.json

A JSON array in Alpaca format. `instruction` and `output` are always non-empty;
`input` may be `""`. Optional fields: `system` (a system prompt) and `history`
(earlier turns as `[user, assistant]` pairs). About 40% of the records are small
exactly-checkable tasks (reverse / repeat / uppercase a word, add, subtract,
multiply, count letters, even or odd, sort numbers, translate a word), the rest
are ordinary questions and answers.

```json
{alpaca_example}
```

## sft/sharegpt_multiturn.jsonl

Multi-turn chats, one JSON object per line. `conversations` holds an optional
leading `system` turn followed by 1 to 4 `human` / `gpt` exchanges, always
alternating and ending with `gpt`.

```json
{sharegpt_example}
```

## dpo/sharegpt_pref.jsonl

Preference pairs in ShareGPT format, one JSON object per line. `conversations`
(optional leading `system`, possibly earlier `human` / `gpt` turns) ends with a
`human` turn; `chosen` is the correct, helpful answer and `rejected` is a wrong
or unhelpful one (`chosen` and `rejected` always differ). Many pairs are
exactly checkable: a correct versus a wrong number, word reversal, and so on.

```json
{dpo_example}
```
"""


def write_readme(files):
    rows = []
    info = {
        "pretrain/en.jsonl": ("pretrain", "JSON Lines, `text`"),
        "pretrain/zh.jsonl": ("pretrain", "JSON Lines, `text`"),
        "pretrain/mixed.json": ("pretrain", "JSON array, `text`"),
        "sft/alpaca_zh_en.json": ("SFT", "JSON array, Alpaca"),
        "sft/sharegpt_multiturn.jsonl": ("SFT", "JSON Lines, ShareGPT"),
        "dpo/sharegpt_pref.jsonl": ("DPO", "JSON Lines, ShareGPT preference"),
    }
    for path, (_, records) in files.items():
        size = os.path.getsize(os.path.join(HERE, path))
        stage, fmt = info[path]
        rows.append(f"| `{path}` | {stage} | {fmt} | {len(records)} | {size / 1024:.0f} KB |")

    def dump(r):
        return json.dumps(r, ensure_ascii=False)

    def shortest(records, pred=lambda r: True):
        cands = [r for r in records if pred(r)]
        return min(cands, key=lambda r: len(dump(r)))

    en = files["pretrain/en.jsonl"][1]
    alpaca = files["sft/alpaca_zh_en.json"][1]
    sharegpt = files["sft/sharegpt_multiturn.jsonl"][1]
    dpo = files["dpo/sharegpt_pref.jsonl"][1]
    text = README_TEMPLATE.format(
        table="\n".join(rows),
        pretrain_example=dump(shortest(en)),
        alpaca_example=dump(shortest(alpaca, lambda r: "history" in r)),
        sharegpt_example=dump(shortest(sharegpt, lambda r: len(r["conversations"]) >= 5
                                       and r["conversations"][0]["from"] == "system")),
        dpo_example=dump(shortest(dpo, lambda r: len(r["conversations"]) >= 3)),
    )
    with open(os.path.join(HERE, "README.md"), "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def main():
    for d in ("pretrain", "sft", "dpo"):
        os.makedirs(os.path.join(HERE, d), exist_ok=True)
    files = {
        "pretrain/en.jsonl": (write_jsonl, gen_pretrain(random.Random(1), "en", 240)),
        "pretrain/zh.jsonl": (write_jsonl, gen_pretrain(random.Random(2), "zh", 240)),
        "pretrain/mixed.json": (write_json, gen_mixed(random.Random(3), 40)),
        "sft/alpaca_zh_en.json": (write_json, gen_alpaca(random.Random(4))),
        "sft/sharegpt_multiturn.jsonl": (write_jsonl, gen_sharegpt(random.Random(5))),
        "dpo/sharegpt_pref.jsonl": (write_jsonl, gen_dpo(random.Random(6))),
    }
    for path, (writer, records) in files.items():
        writer(path, records)
        print(f"{path}: {len(records)} records, {os.path.getsize(os.path.join(HERE, path))} bytes")
    write_readme(files)
    print("README.md")


if __name__ == "__main__":
    main()
