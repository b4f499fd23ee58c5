"""The built-in calibration and evaluation text (`--calib-dataset default`, `--dataset default`): written for
kvflight, no network needed. English prose of many registers (news, instructions, fiction, science, letters,
dialogue), Chinese, code (Python, C, SQL, JavaScript, Rust, Go, shell, Java, HTML, JSON), math, tables, logs,
a chat transcript and a little French / German / Spanish, interleaved so that every packed calibration
sequence mixes them. EVAL_TEXTS are held out: never used for calibration.
"""

from __future__ import annotations

CALIBRATION_TEXTS: tuple[str, ...] = (
    ('The old lighthouse on the northern cape has not guided a ship in forty years, yet every '
     'evening at dusk a volunteer climbs the spiral stairs, polishes the brass, and lights a small '
     'lamp in the window. Nobody asked her to do it. When reporters came to ask why, she said that '
     'some habits keep a town honest about what it used to be.'),
    ('清晨的西湖笼罩在一层薄雾里，远处的保俶塔若隐若现。早起锻炼的老人沿着苏堤慢慢走着，偶尔停下来看看水面上的野鸭。等到太阳升起，雾气散去，湖边便渐渐热闹起来，游船、游客和卖茶叶蛋的小贩都出现了'
     '。'),
    ('def binary_search(items, target):\n    """Return the index of target in the sorted list '
     'items, or -1."""\n    lo, hi = 0, len(items) - 1\n    while lo <= hi:\n        mid = (lo + '
     'hi) // 2\n        if items[mid] == target:\n            return mid\n        if items[mid] < '
     'target:\n            lo = mid + 1\n        else:\n            hi = mid - 1\n    return -1'),
    ('Photosynthesis converts light energy into chemical energy. In the light-dependent reactions, '
     'water is split, oxygen is released, and the energy carriers ATP and NADPH are produced. The '
     'Calvin cycle then uses those carriers to fix carbon dioxide into three-carbon sugars, which '
     'the plant later assembles into glucose, starch and cellulose.'),
    ('Solve for x: 3x + 7 = 22. Subtract 7 from both sides to get 3x = 15, then divide by 3: x = 5. '
     'Check: 3 * 5 + 7 = 15 + 7 = 22, which is correct.'),
    ('To reset your router, unplug it from the wall, wait thirty seconds, and plug it back in. If '
     'the status light stays orange for more than five minutes, press and hold the recessed reset '
     'button on the back with a paperclip for ten seconds. This restores the factory settings, so '
     'you will need to enter your network name and password again.'),
    '人工智能是研究如何让计算机完成通常需要人类智能才能完成的任务的学科，例如识别图像、理解语言和做出决策。近年来，深度学习的发展使得机器翻译、语音识别等应用的准确率大幅提高。',
    ('import json\nfrom pathlib import Path\n\n\ndef load_settings(path: str | Path) -> dict:\n    '
     'path = Path(path)\n    if not path.exists():\n        raise FileNotFoundError(f"settings file '
     '{path} not found")\n    with path.open(encoding="utf-8") as fh:\n        data = '
     'json.load(fh)\n    data.setdefault("log_level", "INFO")\n    return data'),
    ('Dear Ms. Alvarez, thank you for your application for the position of junior data analyst. We '
     'were impressed by your portfolio, in particular the dashboard you built for the community '
     'food bank. We would like to invite you to a first interview on Thursday at 10:30. Please let '
     'us know whether this time works for you.'),
    ("The derivative of f(x) = x^3 - 4x^2 + 2x - 9 is f'(x) = 3x^2 - 8x + 2. Setting f'(x) = 0 "
     'gives x = (8 ± sqrt(64 - 24)) / 6 = (8 ± sqrt(40)) / 6, so the critical points are about x = '
     '0.279 and x = 2.387.'),
    ('The central bank raised its benchmark interest rate by a quarter of a percentage point on '
     'Wednesday, its third increase this year, citing persistent inflation in services and a labor '
     'market that remains tight. Markets had largely expected the move, and bond yields rose only '
     'slightly after the announcement.'),
    '做番茄炒蛋其实很简单：先把鸡蛋打散，加一点盐，用热油炒到刚刚凝固后盛出；再把切块的番茄下锅翻炒，出汁后加少许糖和盐，最后把鸡蛋倒回锅里翻匀即可。关键是火候，鸡蛋不要炒得太老。',
    ('#include <stdio.h>\n#include <stdlib.h>\n\ntypedef struct Node {\n    int value;\n    struct '
     'Node *next;\n} Node;\n\nNode *push(Node *head, int value) {\n    Node *node = '
     'malloc(sizeof(Node));\n    if (node == NULL) {\n        perror("malloc");\n        '
     'exit(1);\n    }\n    node->value = value;\n    node->next = head;\n    return node;\n}\n\nint '
     'main(void) {\n    Node *list = NULL;\n    for (int i = 0; i < 5; i++) list = push(list, i * '
     'i);\n    for (Node *n = list; n != NULL; n = n->next) printf("%d\\n", n->value);\n    return '
     '0;\n}'),
    ('A good sourdough starter needs only flour, water and patience. Mix equal weights of whole '
     'wheat flour and lukewarm water, cover loosely, and leave it at room temperature. Discard half '
     'and feed it every day. After about a week it should double in size within six hours of '
     'feeding and smell pleasantly sour, like yogurt.'),
    ('A train leaves at 14:05 and arrives at 17:50. How long is the trip? From 14:05 to 17:05 is 3 '
     'hours, and from 17:05 to 17:50 is 45 minutes, so the trip takes 3 hours and 45 minutes, or '
     '225 minutes.'),
    ('In 1854 the physician John Snow mapped the cholera deaths in the Soho district of London and '
     'noticed that they clustered around a single water pump on Broad Street. He persuaded the '
     'local council to remove the pump handle. The outbreak was already declining, but his map '
     'became one of the founding documents of epidemiology.'),
    '根据国家统计局发布的数据，今年前三季度全国居民人均可支配收入同比增长百分之五点九，扣除价格因素实际增长百分之五点二。其中，城镇居民收入增速略低于农村居民，城乡收入差距继续缩小。',
    ('SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers AS c\nJOIN '
     "orders AS o ON o.customer_id = c.id\nWHERE o.created_at >= DATE '2024-01-01'\nGROUP BY "
     'c.name\nHAVING COUNT(o.id) > 3\nORDER BY revenue DESC\nLIMIT 10;'),
    ('Q: What is the difference between weather and climate? A: Weather describes the conditions of '
     'the atmosphere over hours or days, such as a rainy afternoon or a cold week. Climate is the '
     'long-term pattern of weather in a region, usually averaged over thirty years or more.'),
    ('Shopping list: 2 kg potatoes, 1 bunch of carrots, 6 eggs, 500 g minced beef, 1 jar of tomato '
     'sauce, spaghetti, parmesan, basil, olive oil, 1 loaf of rye bread, coffee beans, and dish '
     'soap.'),
    ('User: Can you suggest a name for my grey cat? Assistant: Sure! A few ideas: Smokey, Ash, '
     'Pebble, Earl Grey, Nimbus, or Graphite. If your cat is calm and dignified, Earl Grey might '
     'suit; if it is playful, Pebble or Nimbus could be fun.'),
    '用户：请帮我写一句祝贺同事升职的话。助手：恭喜你荣升新职！这是对你多年努力和出色表现的最好肯定，相信你在新的岗位上一定会取得更大的成绩。',
    ('function debounce(fn, waitMs) {\n  let timer = null;\n  return function (...args) {\n    '
     'clearTimeout(timer);\n    timer = setTimeout(() => fn.apply(this, args), waitMs);\n  };\n}\n\n'
     'const onResize = debounce(() => {\n  console.log(`window is now '
     '${window.innerWidth}x${window.innerHeight}`);\n}, 200);\nwindow.addEventListener("resize", '
     'onResize);'),
    ('The committee reviewed the proposal in detail. Three members supported the plan as written, '
     'two asked for a smaller pilot first, and one abstained. After an hour of discussion they '
     'agreed to fund a six-month pilot in two districts, with a report due in March.'),
    ('| Country | Capital | Population (millions) |\n|---------|---------|-----------------------|\n'
     '| Japan   | Tokyo   | 124                   |\n| Brazil  | Brasília| 216                   |\n'
     '| Kenya   | Nairobi | 55                    |\n| Canada  | Ottawa  | 40                    |'),
    ('Glaciers move. Under their own weight, the ice deforms and slides over the bedrock, carrying '
     'boulders and gravel for hundreds of kilometers. When the climate warms and a glacier '
     'retreats, it leaves behind moraines, erratic boulders and long scratches in the rock that '
     'point in the direction the ice once flowed.'),
    '长城并不是一道连续的城墙，而是由不同朝代修建的许多段城墙、关隘和烽火台组成的防御体系。今天人们看到的大部分长城是明朝修建的，东起山海关，西至嘉峪关，全长六千多公里。',
    ('use std::collections::HashMap;\n\nfn word_counts(text: &str) -> HashMap<String, usize> {\n    '
     'let mut counts = HashMap::new();\n    for word in text.split_whitespace() {\n        let word '
     '= word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();\n        if '
     '!word.is_empty() {\n            *counts.entry(word).or_insert(0) += 1;\n        }\n    }\n    '
     'counts\n}\n\nfn main() {\n    let counts = word_counts("the cat and the hat");\n    '
     'println!("{:?}", counts.get("the"));\n}'),
    ('My grandfather kept a notebook of every tree he planted: the species, the date, the weather, '
     'and a short remark. "Oak, 12 April, drizzle, the boy helped." Sixty years later most of those '
     'trees still stand along the lane, and the notebook sits on my shelf, its pages soft as cloth.'),
    ('2024-05-17 09:14:03,221 INFO  server: listening on 0.0.0.0:8080\n2024-05-17 09:14:05,874 '
     'WARN  pool: connection to db-2 timed out after 5000 ms, retrying (1/3)\n2024-05-17 '
     '09:14:06,102 INFO  pool: connected to db-2\n2024-05-17 09:15:41,530 ERROR handler: request '
     "8f3a1c failed: KeyError: 'user_id'"),
    ('The mitochondrion is often called the powerhouse of the cell, but it does much more than '
     'produce ATP. It regulates calcium levels, takes part in programmed cell death, and carries '
     'its own small circular genome, a remnant of the free-living bacterium that was engulfed by an '
     'ancestral cell more than a billion years ago.'),
    '学习编程最好的方法是动手写代码。先从一个小项目开始，比如一个记账程序或者一个简单的网页，遇到问题就去查文档、搜索答案。不要害怕出错，调试的过程本身就是学习。',
    ('#!/usr/bin/env bash\nset -euo pipefail\n\nbackup_dir="/var/backups/$(date +%Y-%m-%d)"\nmkdir '
     '-p "$backup_dir"\nfor db in users orders inventory; do\n  echo "dumping $db"\n  pg_dump '
     '--format=custom "$db" > "$backup_dir/$db.dump"\ndone\nfind /var/backups -maxdepth 1 -type d '
     '-mtime +14 -exec rm -rf {} +'),
    ('Terms of service, section 4.2: The user agrees not to reverse engineer, decompile or '
     'disassemble the software except to the extent that such activity is expressly permitted by '
     'applicable law. Any violation of this section may result in immediate termination of the '
     'license without refund.'),
    ('The probability of rolling at least one six in four throws of a fair die is 1 - (5/6)^4 = 1 - '
     '625/1296 = 671/1296, which is about 0.518, slightly better than even odds.'),
    ('Our hike started at the trailhead at 6 a.m., before the heat. The path climbed steadily '
     'through pine forest, crossed a wooden bridge over a noisy creek, and finally broke out above '
     'the tree line onto a ridge of loose red rock. From the summit we could see three lakes and, '
     'far to the west, the thin silver line of the sea.'),
    '秋天到了，院子里的柿子树挂满了红彤彤的果子，像一盏盏小灯笼。奶奶每年都会挑一些做成柿饼，挂在屋檐下晾晒。等到冬天，柿饼表面结出一层白霜，咬一口又甜又软。',
    ('class LRUCache:\n    def __init__(self, capacity: int) -> None:\n        self.capacity = '
     'capacity\n        self.data: dict[int, int] = {}\n\n    def get(self, key: int) -> '
     'int:\n        if key not in self.data:\n            return -1\n        value = '
     'self.data.pop(key)\n        self.data[key] = value  # most recently used goes last\n        '
     'return value\n\n    def put(self, key: int, value: int) -> None:\n        self.data.pop(key, '
     'None)\n        self.data[key] = value\n        if len(self.data) > '
     'self.capacity:\n            self.data.pop(next(iter(self.data)))'),
    ('Interest compounds. If you save 100 dollars at an annual rate of 5 percent, after one year '
     'you have 105 dollars, after two years 110.25, and after ten years about 162.89. The same rule '
     'works against you with debt, which is why paying off a high-interest credit card is often the '
     'best investment available.'),
    ('Le petit déjeuner est servi de sept heures à dix heures dans la salle du rez-de-chaussée. '
     'Pour toute demande particulière, veuillez vous adresser à la réception, ouverte vingt-quatre '
     'heures sur vingt-quatre.'),
    ('The violinist tuned her instrument slowly, string by string, while the audience settled. Then '
     'the hall went quiet, and she began the slow movement of the concerto, a melody so plain that '
     'it seemed anyone could have written it, until the harmony shifted underneath and made the '
     'whole room hold its breath.'),
    '请注意：本次航班因天气原因延误，预计起飞时间推迟至十九点三十分。请各位旅客在候机厅耐心等待，航空公司将为您提供免费餐食。给您带来的不便，我们深表歉意。',
    ('import torch\nimport torch.nn as nn\n\n\nclass MLP(nn.Module):\n    def __init__(self, dim: '
     'int, hidden: int) -> None:\n        super().__init__()\n        self.up = nn.Linear(dim, '
     'hidden)\n        self.down = nn.Linear(hidden, dim)\n\n    def forward(self, x: torch.Tensor) '
     '-> torch.Tensor:\n        return self.down(torch.relu(self.up(x)))\n\n\nmodel = MLP(64, 256)\n'
     'optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)\nx = torch.randn(32, 64)\nloss = '
     '(model(x) - x).pow(2).mean()\nloss.backward()\noptimizer.step()'),
    ('Version 2.3.0 release notes: added support for reading compressed archives; fixed a crash '
     'when the configuration file contained an empty section; improved startup time by about 30 '
     'percent; deprecated the --legacy-mode flag, which will be removed in version 3.0.'),
    ('Die Bibliothek bleibt am Montag wegen einer Betriebsversammlung geschlossen. Ausgeliehene '
     'Medien können über den Rückgabeautomaten am Haupteingang zurückgegeben werden.'),
    ('Volcanic islands form when magma rises through the ocean floor. Hawaii sits above a hot spot '
     'in the mantle; as the Pacific plate drifts northwest, new islands form over the hot spot '
     'while older ones move away, cool, erode and sink. That is why the island of Hawaii is young '
     'and active, and Kauai is old and deeply carved.'),
    '水的沸点与气压有关。在标准大气压下，水在一百摄氏度沸腾；而在青藏高原等高海拔地区，气压较低，水在八十多度就会沸腾，所以用普通锅很难把米饭煮熟，需要使用高压锅。',
    ('package main\n\nimport (\n\t"fmt"\n\t"net/http"\n)\n\nfunc health(w http.ResponseWriter, r '
     '*http.Request) {\n\tw.Header().Set("Content-Type", "application/json")\n\tfmt.Fprintln(w, '
     '`{"status": "ok"}`)\n}\n\nfunc main() {\n\thttp.HandleFunc("/health", health)\n\tif err := '
     'http.ListenAndServe(":8080", nil); err != nil {\n\t\tpanic(err)\n\t}\n}'),
    ('The recipe calls for two cups of flour, one teaspoon of baking soda, half a teaspoon of salt, '
     'one cup of sugar, two eggs, half a cup of melted butter, and three very ripe bananas. Mix the '
     'wet and dry ingredients separately, combine them gently, and bake at 175 degrees Celsius for '
     'about an hour.'),
    ('El mercado abre los sábados a las ocho de la mañana. Allí se pueden comprar frutas de '
     'temporada, quesos de la región, pan recién horneado y flores, y casi siempre hay música en la '
     'plaza.'),
    ('When the train stopped between stations for the third time, the passengers stopped pretending '
     'to read. A man offered around a bag of oranges, a student played a song on her phone, and by '
     "the time the train moved again half the carriage knew each other's names."),
    '《红楼梦》是中国古典小说的巅峰之作，以贾、史、王、薛四大家族的兴衰为背景，讲述了贾宝玉、林黛玉和薛宝钗之间的爱情与婚姻悲剧，描绘了一个封建大家族由盛转衰的全过程。',
    ('{\n  "name": "weather-widget",\n  "version": "1.4.2",\n  "scripts": {\n    "build": "vite '
     'build",\n    "test": "vitest run",\n    "lint": "eslint src --ext .ts,.tsx"\n  },\n  '
     '"dependencies": {\n    "react": "^18.2.0",\n    "date-fns": "^3.0.0"\n  }\n}'),
    ('Machine learning models learn patterns from data rather than following rules written by hand. '
     'A model for detecting spam, for example, is shown thousands of emails labeled spam or not '
     'spam, and it adjusts its internal parameters until it can label new emails correctly. Its '
     'quality depends heavily on how representative the training data is.'),
    'Haiku: "Morning frost on glass / the kettle starts its small song / steam writes on the pane."',
    ('Please note that the library will be closed on Monday for the public holiday. Books due that '
     'day may be returned on Tuesday without a fine. The online catalogue and e-book service will '
     'remain available throughout the weekend.'),
    '我们公司计划在下个月推出新版本的手机应用，主要改进包括：界面重新设计、启动速度提升百分之四十、新增夜间模式，以及修复用户反馈的若干问题。欢迎大家在测试阶段提出宝贵意见。',
    ('<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n  '
     '<title>Contact</title>\n</head>\n<body>\n  <form action="/send" method="post">\n    <label '
     'for="email">Email</label>\n    <input id="email" name="email" type="email" required>\n    '
     '<textarea name="message" rows="5"></textarea>\n    <button type="submit">Send</button>\n  '
     '</form>\n</body>\n</html>'),
    ('The Silk Road was not a single road but a web of caravan routes linking China with Central '
     'Asia, Persia, and the Mediterranean. Silk traveled west, while glassware, horses, and silver '
     'traveled east. Ideas moved too: Buddhism spread into China along these routes, as did '
     'techniques for papermaking in the other direction.'),
    ('Limerick: There once was a coder named Lee, who wrote tests for each function with glee; when '
     'the build turned to red, she just shrugged and said, "At least now the bug\'s plain to see."'),
    ('Running a marathon is mostly a matter of pacing. Beginners often start too fast, carried by '
     'the excitement of the crowd, and pay for it after thirty kilometers. A steady pace, regular '
     'sips of water, and a few energy gels usually get you to the finish line in far better shape.'),
    '问：为什么天空是蓝色的？答：阳光由各种颜色的光组成。当阳光穿过大气层时，波长较短的蓝光比波长较长的红光更容易被空气分子散射，因此我们从各个方向看到的天空都是蓝色的。',
    ('def fibonacci(n: int) -> list[int]:\n    # The first n Fibonacci numbers, iteratively.\n    '
     'sequence = [0, 1]\n    while len(sequence) < n:\n        sequence.append(sequence[-1] + '
     'sequence[-2])\n    return sequence[:n]\n\n\nif __name__ == "__main__":\n    '
     'print(fibonacci(10))  # [0, 1, 1, 2, 3, 5, 8, 13, 21, 34]'),
    ('A prime number has exactly two divisors: one and itself. The first few primes are 2, 3, 5, 7, '
     '11, 13, 17, 19, 23 and 29. Euclid proved more than two thousand years ago that there are '
     'infinitely many of them: multiply any finite list of primes together, add one, and the result '
     'has a prime factor that is not on the list.'),
    ('Ingredients per serving: 250 kcal, protein 12 g, carbohydrates 31 g, of which sugars 9 g, fat '
     '8 g, of which saturated 2.5 g, fiber 4 g, salt 0.6 g.'),
    ('It rained the whole week of the festival. The organizers handed out ponchos, the bands played '
     'under tarpaulins, and the fields turned into mud that swallowed boots whole. Years later, '
     'people who were there still talk about it as the best festival they ever attended.'),
    '小时候，每到夏天的晚上，一家人就搬着竹椅坐在巷子口乘凉。大人们摇着蒲扇聊天，孩子们追着萤火虫跑来跑去。那时候没有空调，也没有手机，可日子好像过得特别慢，也特别安静。',
    ('public class BankAccount {\n    private final String owner;\n    private long '
     'balanceCents;\n\n    public BankAccount(String owner) {\n        this.owner = owner;\n    '
     '}\n\n    public void deposit(long cents) {\n        if (cents <= 0) throw new '
     'IllegalArgumentException("deposit must be positive");\n        balanceCents += cents;\n    '
     '}\n\n    public boolean withdraw(long cents) {\n        if (cents > balanceCents) return '
     'false;\n        balanceCents -= cents;\n        return true;\n    }\n}'),
    ('Customer: My order arrived damaged. The box was crushed and the lamp inside is cracked. '
     'Support agent: I am very sorry about that. Could you send us a photo of the damage? We will '
     'ship a replacement right away, and you do not need to return the broken lamp.'),
    ('Flight KL1234 Amsterdam (AMS) to Lisbon (LIS), departure 07:40, gate D7, seat 23C, boarding '
     'closes 20 minutes before departure. Baggage allowance: one cabin bag up to 12 kg.'),
    ('The human heart beats about one hundred thousand times a day, pumping roughly seven thousand '
     'liters of blood. Its four chambers work in two coordinated pairs: the right side sends blood '
     'to the lungs to pick up oxygen, and the left side pushes oxygen-rich blood out to the rest of '
     'the body.'),
    '经济学中的机会成本指的是为了得到某种东西而放弃的其他东西的最大价值。比如你花一个下午看电影，机会成本可能就是这段时间本可以用来学习或者工作所能获得的收益。',
    ('git checkout -b fix/login-timeout\ngit add src/auth/session.py tests/test_session.py\ngit '
     'commit -m "Extend session timeout to 30 minutes and test the refresh path"\ngit push -u '
     'origin fix/login-timeout'),
    ("Chess openings have colorful names: the Sicilian Defense, the Queen's Gambit, the King's "
     'Indian, the Ruy Lopez. Most of them are named after places or players from the nineteenth '
     'century, when the theory of the opening moves was first written down systematically in books '
     'and magazines.'),
    ('1. Preheat the oven to 200 °C. 2. Cut the vegetables into even pieces. 3. Toss them with oil, '
     'salt and thyme. 4. Roast for 35 minutes, turning once. 5. Finish with lemon juice and chopped '
     'parsley.'),
    ('The city council approved a plan to plant twenty thousand trees over the next decade, '
     'focusing on neighborhoods with the least shade. Studies show that streets lined with trees '
     'can be several degrees cooler on summer afternoons, which matters more each year as heat '
     'waves grow longer.'),
    '熊猫主要生活在中国四川、陕西和甘肃的山区竹林中。它们每天要花十几个小时吃竹子，一只成年熊猫一天可以吃掉十几公斤竹子。由于栖息地保护工作的开展，野生大熊猫的数量近年来有所回升。',
    ('FROM python:3.12-slim\nWORKDIR /app\nCOPY requirements.txt .\nRUN pip install --no-cache-dir '
     '-r requirements.txt\nCOPY . .\nEXPOSE 8000\nCMD ["uvicorn", "app.main:app", "--host", '
     '"0.0.0.0", "--port", "8000"]'),
    ('Good documentation answers three questions quickly: what does this do, how do I start, and '
     'where do I look when something goes wrong. Everything else, including architecture diagrams '
     'and design rationale, is valuable, but readers should not have to wade through it to run '
     'their first example.'),
    ('E = mc^2 states that energy and mass are equivalent: a mass m at rest has an energy equal to '
     'm times the speed of light squared. Because c^2 is about 9 × 10^16 m^2/s^2, even a gram of '
     'matter corresponds to roughly 90 terajoules.'),
    ('Octopuses have three hearts and blue blood. Two hearts pump blood through the gills, and the '
     'third pumps it to the rest of the body. Their blood uses a copper-based protein called '
     'hemocyanin to carry oxygen, which works better than hemoglobin in cold water with little '
     'oxygen.'),
    '会议纪要：一、项目进度基本符合预期，测试工作将于本周五完成；二、市场部需在月底前提交推广方案；三、下次例会时间定为下周三上午十点，地点为三楼会议室。',
    ('He opened the letter standing in the hallway, still wearing his coat. It was short, only four '
     'lines, in handwriting he had not seen for twenty years. He read it twice, folded it carefully '
     'along the original creases, and sat down on the stairs.'),
    ('If all bloops are razzies and all razzies are lazzies, then all bloops are definitely '
     'lazzies. But if some lazzies are wizzies, we cannot conclude that any bloops are wizzies, '
     'because the lazzies that are wizzies might not be bloops.'),
    ('Inflation measures how quickly prices rise across an economy. Economists track it with price '
     'indices built from baskets of goods and services, such as food, rent, transport, and medical '
     'care. Moderate inflation is considered normal; very high inflation erodes savings and makes '
     'planning difficult.'),
    '春节是中国最重要的传统节日。除夕夜，家家户户贴春联、吃年夜饭、守岁；大年初一，人们穿上新衣服，走亲访友，互相拜年，孩子们还会收到长辈给的红包。',
    ('Step one: remove the four screws holding the back panel. Step two: disconnect the battery '
     'cable by pulling gently on the plastic tab, never on the wires. Step three: lift out the old '
     'battery, insert the new one with the label facing up, reconnect the cable, and replace the '
     'panel.'),
    ('<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nGive me three '
     'tips for staying focused while working from home.<|im_end|>\n<|im_start|>assistant\n1. Keep a '
     "fixed start time and a dedicated workspace. 2. Plan the day's three most important tasks the "
     'evening before. 3. Take short breaks away from screens every hour or so.<|im_end|>\n'
     '<|im_start|>user\nTranslate "Where is the train station?" into Spanish and French.<|im_end|>\n'
     '<|im_start|>assistant\nSpanish: "¿Dónde está la estación de tren?" French: "Où est la gare '
     '?"<|im_end|>'),
    ('Bees communicate the location of flowers with a dance. A forager returning to the hive walks '
     'in a figure-eight pattern, waggling her body during the straight run. The angle of that run '
     'relative to vertical tells the other bees the direction of the food relative to the sun, and '
     'its duration tells them the distance.'),
    '如果你的电脑运行越来越慢，可以尝试以下方法：关闭开机自动启动的程序，清理磁盘上的临时文件，卸载不常用的软件，检查是否有病毒，必要时增加内存或更换固态硬盘。',
    ("The museum's new wing displays textiles from across South Asia: embroidered shawls from "
     'Kashmir, block-printed cottons from Rajasthan, and silk saris woven with gold thread in '
     'Varanasi. Visitors can watch a weaver at work on a traditional loom every Saturday afternoon.'),
    ('Sleep is not a passive state. During deep sleep the brain consolidates memories and clears '
     'metabolic waste; during REM sleep it replays and reorganizes experiences. Adults who '
     'regularly sleep fewer than six hours a night show measurable declines in attention, mood, and '
     'immune function.'),
    '古人云：“读万卷书，行万里路。”读书可以让我们了解前人的智慧，旅行则让我们亲眼看到世界的广阔。两者结合，才能真正开阔眼界，增长见识。',
    ('Meeting notes, 14 March. Attendees: Priya, Tom, Keiko, Ahmed. Decisions: the launch moves to '
     'May 2; Tom owns the migration plan; Keiko will draft the customer announcement. Open '
     "questions: pricing for the enterprise tier, and whether to keep the free plan's storage limit "
     'at five gigabytes.'),
    ('The bridge was designed to sway. Engineers know that a structure which is too stiff will '
     'crack under wind and traffic, so the deck hangs from cables that let it move a little in '
     'every direction, absorbing energy the way a tree bends in a storm rather than snapping.'),
    ('Learning a language as an adult is slower than as a child, but adults have advantages: they '
     'can study grammar deliberately, use dictionaries and apps, and connect new words to things '
     'they already know. Daily practice, even fifteen minutes, matters more than occasional long '
     'sessions.'),
    ('The first photograph of a black hole, published in 2019, shows a ring of glowing gas around '
     'the shadow of the supermassive black hole at the center of the galaxy M87. It was made by '
     'combining data from radio telescopes around the world into a virtual telescope the size of '
     'the Earth.'),
    ('She planted tomatoes, beans and zucchini in the spring and spent the summer losing a slow war '
     'against snails. By August she had more zucchini than the neighborhood could eat, three heroic '
     'tomatoes, and a new respect for farmers.'),
    ('Antibiotics kill bacteria or stop them from multiplying, but they have no effect on viruses '
     'such as those that cause colds and flu. Taking antibiotics when they are not needed '
     'contributes to antibiotic resistance, in which bacteria evolve to survive the drugs designed '
     'to kill them.'),
    ('Dear team, a quick reminder that the quarterly reports are due this Friday. Please use the '
     'new template in the shared folder, include a one-paragraph summary at the top, and flag any '
     "numbers that differ by more than ten percent from last quarter's forecast."),
    ('In the story, the fox visits the little prince every day at the same hour, so that the '
     'prince\'s coming becomes something to look forward to. "It is the time you have wasted for '
     'your rose that makes your rose so important," the fox says, and the prince repeats it so that '
     'he will remember.'),
    ('The price of solar panels fell by roughly ninety percent between 2010 and 2020. Combined with '
     'cheaper batteries, this has made solar power the cheapest source of new electricity in many '
     'parts of the world, although storing energy for nights and winters remains a challenge.'),
    ('Writing tip: prefer concrete words to abstract ones. Instead of "the weather was bad", write '
     '"sleet hammered the windows". Instead of "she was nervous", show her folding and unfolding '
     'the corner of her ticket. Readers believe what they can see.'),
    ('Tides are caused mainly by the gravitational pull of the Moon. The side of the Earth facing '
     "the Moon is pulled slightly more than the Earth's center, and the far side slightly less, "
     'producing two bulges of water. As the Earth rotates, most coastlines pass through two high '
     'tides and two low tides each day.'),
    ('The match went to a penalty shootout after a goalless extra time. The young goalkeeper, '
     'playing only his fourth professional game, saved two penalties, and the stadium erupted when '
     'the last shot sailed over the bar.'),
    ('Rust prevents data races at compile time through its ownership rules: each value has a single '
     'owner, and references are either many shared readers or one exclusive writer, never both at '
     'once. The borrow checker enforces these rules, which feels strict at first but removes a '
     'whole class of bugs.'),
    ('Thank you for contacting the help desk. Your ticket number is 48213. A technician will '
     'respond within one business day. In the meantime, you may find an answer to your question in '
     'our knowledge base, which covers password resets, printer setup, and VPN access.'),
    ('Coral reefs cover less than one percent of the ocean floor but shelter about a quarter of all '
     'marine species. Corals are animals that live in partnership with algae; when water becomes '
     'too warm, the corals expel the algae and turn white, a process called bleaching that can kill '
     'the reef if it lasts too long.'),
    ('At the edge of the village there is a bakery that opens at four in the morning. By five, the '
     'street smells of bread, and a line of people in work clothes waits outside, stamping their '
     'feet in the cold, exchanging the news of the day before it has happened.'),
    ('A function is a rule that assigns to each input exactly one output. The function f(x) = x '
     'squared sends 3 to 9 and -3 to 9 as well; two inputs may share an output, but one input may '
     'never have two outputs. Graphs of functions pass the vertical line test for this reason.'),
    ('The negotiation lasted nine hours. Both sides wanted the deal, but neither wanted to be the '
     'first to move on price. In the end, it was a small concession on delivery dates, offered '
     'almost as an afterthought, that broke the deadlock.'),
    ('Most of the universe is invisible. Ordinary matter, everything made of atoms, makes up only '
     'about five percent of its content. Roughly a quarter is dark matter, detected only through '
     'its gravity, and the rest is dark energy, which appears to be accelerating the expansion of '
     'space.'),
    ('The apartment was small but bright, with a narrow balcony facing a courtyard full of lemon '
     "trees. In the mornings, the neighbor's radio played old songs, and pigeons argued on the "
     'railing while I drank my coffee and planned the day.'),
    ('When debugging, change one thing at a time. Form a hypothesis, design a small experiment that '
     'could prove it wrong, run it, and write down the result. It is slower than trying random '
     'fixes, but it converges, and you learn how the system actually works along the way.'),
    ('Elephants mourn their dead. Researchers have observed herds standing silently by the body of '
     'a relative, touching it gently with their trunks and feet, and returning to the bones months '
     'or even years later.'),
    ("The Treaty of Westphalia in 1648 ended the Thirty Years' War and is often cited as the origin "
     'of the modern system of sovereign states, in which each state has exclusive authority over '
     'its territory and other states do not interfere in its internal affairs.'),
    ("Keep your password manager's master password long and memorable, for example four random "
     'words joined together. Turn on two-factor authentication for your email first, because '
     'whoever controls your email can reset the passwords of almost every other account.'),
    ('The storm arrived faster than forecast. Within an hour the sky turned the color of a bruise, '
     'the wind stripped leaves from the poplars, and hail drummed on the roofs of the parked cars. '
     'Then, as suddenly as it had come, it was gone, and the evening light came back gold and clean.'),
    ('Vaccines train the immune system to recognize a pathogen without causing the disease. Some '
     'contain weakened or inactivated viruses, others only a single protein, and newer mRNA '
     'vaccines give cells instructions to make that protein themselves, prompting an immune '
     'response that is remembered for years.'),
    ('Gradient descent finds a minimum of a function by taking repeated steps in the direction of '
     'steepest descent. The size of each step is set by the learning rate: too small and training '
     'crawls, too large and the updates overshoot and diverge. Most modern optimizers adapt the '
     'step size for each parameter.'),
    ('The report concludes that the project is on schedule but over budget by eight percent, mainly '
     'because of higher steel prices. It recommends renegotiating two supplier contracts and '
     'postponing the landscaping phase until the next fiscal year.'),
    ('There is a particular silence in a library at closing time: the clock ticking, a cart '
     'squeaking somewhere between the shelves, the lights going off row by row. I used to stay '
     'until the last minute just to hear it.'),
)

EVAL_TEXTS: tuple[str, ...] = (
    ('The harbor town woke slowly. Fishing boats came in with the tide, gulls circled over the '
     'crates of mackerel, and the woman who ran the café at the end of the pier unstacked her '
     "chairs one by one, as she had done every morning for thirty years. By nine o'clock the first "
     'tourists were photographing the nets drying on the wall.'),
    ('Electric cars are simpler machines than petrol cars. An electric motor has a handful of '
     'moving parts, while an internal combustion engine has hundreds. There is no gearbox to speak '
     'of, no oil to change, and braking partly recovers energy into the battery, which is why brake '
     'pads on electric cars last much longer.'),
    ('The project team met on Tuesday to review the schedule. The design phase finished a week late '
     'because two suppliers changed their delivery dates, but the team expects to recover the time '
     'during testing. The next milestone is a demonstration for the client at the end of the month.'),
    ('Rivers shape the land over thousands of years. Near their sources they cut steep valleys into '
     'the hills; further downstream, where the ground is flatter, they slow down, drop their '
     'sediment, and wander in wide loops called meanders. Near the sea many rivers split into '
     'channels and build a delta from the mud they carry.'),
    ('My first job was washing dishes in a busy restaurant kitchen. The work was hot and loud, and '
     'the chef shouted constantly, but at the end of every night the cooks sat together and ate '
     'whatever was left, and that meal, eaten standing up at midnight, was the best part of the day.'),
    ('To make a cup of pour-over coffee, heat water to about 94 degrees, rinse the paper filter, '
     'and add 15 grams of medium-fine ground coffee. Pour a little water to let the grounds bloom '
     'for thirty seconds, then pour the rest slowly in circles until you have about 250 grams of '
     'coffee.'),
    '图书馆是城市的公共客厅。在这里，学生准备考试，老人读报纸，孩子们在绘本区里安静地翻书。好的图书馆不仅提供书籍，也提供一个让人安心停留的空间。',
    ('def mean_and_std(values):\n    n = len(values)\n    mean = sum(values) / n\n    variance = '
     'sum((v - mean) ** 2 for v in values) / n\n    return mean, variance ** 0.5'),
    ('Scientists estimate that the Earth is about 4.5 billion years old. The evidence comes from '
     'radiometric dating of the oldest minerals and meteorites, which measures how much of a '
     'radioactive element has decayed into its stable products over time.'),
    ('The small theater on Elm Street reopened last weekend after a two-year renovation. The new '
     'seats are wider, the sound system has been replaced, and the old hand-painted ceiling, hidden '
     'for decades behind plaster, has been restored to its original colors.'),
)
